import django.contrib.postgres.indexes
import django.contrib.postgres.search
import django.db.models.deletion
from django.db import migrations, models

# Rows for the documents already ingested: what knowledge.services.document_terms_refresh writes.
_TERMS_BACKFILL = """
INSERT INTO knowledge_documentterm (knowledge_base_id, document_id, lexeme, chunks)
SELECT c.knowledge_base_id, c.document_id, t.lexeme, count(*)
FROM knowledge_chunk c CROSS JOIN LATERAL unnest(c.search_vector) t
GROUP BY c.knowledge_base_id, c.document_id, t.lexeme
"""


class Migration(migrations.Migration):
    """A reranker per knowledge base, and BM25F over three fields (the document's title, the chunk's
    heading, its text; weight labels A, B and D tell them apart) and the per-document lexeme counts
    it takes its statistics from.
    A generated column cannot be altered: it is dropped and added again (its index with it)."""

    dependencies = [
        ("knowledge", "0004_chunk_embedding_inline"),
    ]

    operations = [
        migrations.AddField(
            model_name="chunk",
            name="title",
            field=models.CharField(blank=True, default="", max_length=500),
        ),
        migrations.RunSQL(
            "UPDATE knowledge_chunk c SET title = d.title FROM knowledge_document d WHERE d.id = c.document_id",
            migrations.RunSQL.noop,
        ),
        migrations.RemoveIndex(model_name="chunk", name="chunk_search_vector_gin"),
        migrations.RemoveField(model_name="chunk", name="search_vector"),
        migrations.AddField(
            model_name="chunk",
            name="search_vector",
            field=models.GeneratedField(
                db_persist=True,
                expression=django.contrib.postgres.search.CombinedSearchVector(
                    django.contrib.postgres.search.CombinedSearchVector(
                        django.contrib.postgres.search.SearchVector("title", config="english", weight="A"),
                        "||",
                        django.contrib.postgres.search.SearchVector("heading", config="english", weight="B"),
                        django.contrib.postgres.search.SearchConfig("english"),
                    ),
                    "||",
                    django.contrib.postgres.search.SearchVector("text", config="english", weight="D"),
                    django.contrib.postgres.search.SearchConfig("english"),
                ),
                output_field=django.contrib.postgres.search.SearchVectorField(),
            ),
        ),
        migrations.AddIndex(
            model_name="chunk",
            index=django.contrib.postgres.indexes.GinIndex(fields=["search_vector"], name="chunk_search_vector_gin"),
        ),
        migrations.CreateModel(
            name="DocumentTerm",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("lexeme", models.TextField()),
                ("chunks", models.PositiveIntegerField()),
                (
                    "document",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE, related_name="terms", to="knowledge.document"
                    ),
                ),
                (
                    "knowledge_base",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE, related_name="+", to="knowledge.knowledgebase"
                    ),
                ),
            ],
            options={
                "indexes": [
                    models.Index(
                        fields=["knowledge_base", "lexeme"], include=("chunks",), name="document_term_kb_lexeme"
                    )
                ],
                "constraints": [models.UniqueConstraint(fields=("document", "lexeme"), name="document_term_unique")],
            },
        ),
        migrations.RunSQL(_TERMS_BACKFILL, migrations.RunSQL.noop),
        migrations.AddField(
            model_name="knowledgebase",
            name="reranker",
            field=models.JSONField(blank=True, default=dict),
        ),
    ]
