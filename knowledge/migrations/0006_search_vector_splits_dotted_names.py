import django.contrib.postgres.indexes
import django.contrib.postgres.search
from django.db import migrations, models

_PATTERN = "[._/]+(?=[[:alpha:]])"


def _searchable(field_name: str) -> models.Func:
    return models.Func(
        models.F(field_name),
        models.Value(_PATTERN),
        models.Value(" "),
        models.Value("g"),
        function="regexp_replace",
        output_field=models.TextField(),
    )


class Migration(migrations.Migration):
    """Dotted, snake_case and slashed names ("numpy.linspace", "refund_policy.pdf") are split into
    their words before indexing (knowledge.models.searchable_text); the generated column is dropped
    and added again, and BM25's per-document lexeme counts are recounted from it."""

    dependencies = [
        ("knowledge", "0005_bm25_fields_and_terms"),
    ]

    operations = [
        migrations.RemoveIndex(model_name="chunk", name="chunk_search_vector_gin"),
        migrations.RemoveField(model_name="chunk", name="search_vector"),
        migrations.AddField(
            model_name="chunk",
            name="search_vector",
            field=models.GeneratedField(
                db_persist=True,
                expression=django.contrib.postgres.search.CombinedSearchVector(
                    django.contrib.postgres.search.CombinedSearchVector(
                        django.contrib.postgres.search.SearchVector(_searchable("title"), config="english", weight="A"),
                        "||",
                        django.contrib.postgres.search.SearchVector(
                            _searchable("heading"), config="english", weight="B"
                        ),
                        django.contrib.postgres.search.SearchConfig("english"),
                    ),
                    "||",
                    django.contrib.postgres.search.SearchVector(_searchable("text"), config="english", weight="D"),
                    django.contrib.postgres.search.SearchConfig("english"),
                ),
                output_field=django.contrib.postgres.search.SearchVectorField(),
            ),
        ),
        migrations.AddIndex(
            model_name="chunk",
            index=django.contrib.postgres.indexes.GinIndex(fields=["search_vector"], name="chunk_search_vector_gin"),
        ),
        migrations.RunSQL(
            """
            DELETE FROM knowledge_documentterm;
            INSERT INTO knowledge_documentterm (knowledge_base_id, document_id, lexeme, chunks)
            SELECT c.knowledge_base_id, c.document_id, t.lexeme, count(*)
            FROM knowledge_chunk c CROSS JOIN LATERAL unnest(c.search_vector) t
            GROUP BY c.knowledge_base_id, c.document_id, t.lexeme
            """,
            migrations.RunSQL.noop,
        ),
    ]
