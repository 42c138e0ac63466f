"""REST endpoints for knowledge bases, documents and search (thin: translate, call, translate)."""

from __future__ import annotations

from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.parsers import MultiPartParser
from rest_framework.response import Response

from knowledge import selectors, services
from knowledge.models import Document, KnowledgeBase
from knowledge.retrieval import retrieve
from tenants.api_base import StrictQuerySerializer, StrictSerializer, TenantAPIView
from tenants.errors import ValidationFailed
from tenants.json_input import BoundedJSONParser

# Multipart framing around the file itself; a body beyond the plan's limit plus this is refused
# before it is read.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
SEARCH_MAX_K = 50


def _public_embedder(config: dict) -> dict:
    """The embedder settings without secrets."""
    return {key: ("********" if key == "api_key" and value else value) for key, value in config.items()}


class KnowledgeBaseOutputSerializer(serializers.ModelSerializer):
    embedder = serializers.SerializerMethodField()
    reranker = serializers.SerializerMethodField()
    document_count = serializers.IntegerField(read_only=True, default=0)
    chunk_count = serializers.SerializerMethodField()

    class Meta:
        model = KnowledgeBase
        fields = [
            "id",
            "name",
            "description",
            "embedder",
            "reranker",
            "dimensions",
            "version",
            "document_count",
            "chunk_count",
            "created_at",
            "updated_at",
        ]

    def get_embedder(self, knowledge_base) -> dict:
        return _public_embedder(knowledge_base.embedder)

    def get_reranker(self, knowledge_base) -> dict:
        return _public_embedder(knowledge_base.reranker)

    def get_chunk_count(self, knowledge_base) -> int:
        return getattr(knowledge_base, "chunk_count", None) or 0


class KnowledgeBaseInputSerializer(StrictSerializer):
    name = serializers.CharField(max_length=200)
    description = serializers.CharField(max_length=5000, allow_blank=True, required=False)
    embedder = serializers.JSONField(required=False, help_text='{"kind": "local"} or {"kind": "openai", …}')
    reranker = serializers.JSONField(
        required=False, help_text='{} (none) or {"kind": "http", "base_url": …, "model": …} (knowledge.reranking)'
    )


class KnowledgeBaseListCreateApi(TenantAPIView):
    required_scopes = {"GET": "knowledge:read", "POST": "knowledge:write"}

    @extend_schema(responses=KnowledgeBaseOutputSerializer(many=True))
    def get(self, request):
        data = KnowledgeBaseOutputSerializer(selectors.knowledge_base_list(), many=True).data
        return Response({"object": "list", "data": data})

    @extend_schema(request=KnowledgeBaseInputSerializer, responses={201: KnowledgeBaseOutputSerializer})
    def post(self, request):
        serializer = KnowledgeBaseInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        knowledge_base = services.knowledge_base_create(**serializer.validated_data)
        return Response(
            KnowledgeBaseOutputSerializer(selectors.knowledge_base_get(knowledge_base_id=knowledge_base.pk)).data,
            status=status.HTTP_201_CREATED,
        )


class KnowledgeBaseDetailApi(TenantAPIView):
    required_scopes = {"GET": "knowledge:read", "PATCH": "knowledge:write", "DELETE": "knowledge:write"}

    @extend_schema(responses=KnowledgeBaseOutputSerializer)
    def get(self, request, kb_id: str):
        return Response(KnowledgeBaseOutputSerializer(selectors.knowledge_base_get(knowledge_base_id=kb_id)).data)

    @extend_schema(request=KnowledgeBaseInputSerializer(partial=True), responses=KnowledgeBaseOutputSerializer)
    def patch(self, request, kb_id: str):
        knowledge_base = selectors.knowledge_base_get(knowledge_base_id=kb_id)
        serializer = KnowledgeBaseInputSerializer(data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        services.knowledge_base_update(knowledge_base=knowledge_base, **serializer.validated_data)
        return Response(KnowledgeBaseOutputSerializer(selectors.knowledge_base_get(knowledge_base_id=kb_id)).data)

    @extend_schema(responses={204: None})
    def delete(self, request, kb_id: str):
        services.knowledge_base_delete(knowledge_base=selectors.knowledge_base_get(knowledge_base_id=kb_id))
        return Response(status=status.HTTP_204_NO_CONTENT)


# --- documents ----------------------------------------------------------------------------------


class DocumentOutputSerializer(serializers.ModelSerializer):
    error = serializers.SerializerMethodField()

    class Meta:
        model = Document
        fields = [
            "id",
            "knowledge_base",
            "title",
            "source",
            "source_url",
            "filename",
            "kind",
            "size_bytes",
            "checksum",
            "status",
            "progress",
            "error",
            "page_count",
            "chunk_count",
            "token_count",
            "created_at",
            "updated_at",
            "ingested_at",
        ]

    def get_error(self, document) -> dict | None:
        if not document.error:
            return None
        return {"message": document.error, "code": document.error_code}


class DocumentJsonInputSerializer(StrictSerializer):
    title = serializers.CharField(max_length=500, allow_blank=True, required=False)
    text = serializers.CharField(allow_blank=True, trim_whitespace=False, required=False)
    url = serializers.CharField(max_length=2048, required=False)

    def validate(self, attrs):
        if ("text" in attrs) == ("url" in attrs):
            raise ValidationFailed("Send either 'text' (with an optional 'title') or 'url'.", param="text")
        return attrs


class DocumentListCreateApi(TenantAPIView):
    required_scopes = {"GET": "knowledge:read", "POST": "knowledge:write"}
    parser_classes = [BoundedJSONParser, MultiPartParser]

    @extend_schema(
        parameters=[OpenApiParameter("status", str, enum=Document.Status.values, required=False)],
        responses=DocumentOutputSerializer(many=True),
    )
    def get(self, request, kb_id: str):
        knowledge_base = selectors.knowledge_base_get(knowledge_base_id=kb_id)
        wanted = request.query_params.get("status")
        if wanted is not None and wanted not in Document.Status.values:
            raise ValidationFailed(f"status must be one of {', '.join(Document.Status.values)}.", param="status")
        documents = selectors.document_list(knowledge_base=knowledge_base, status=wanted)[:500]
        return Response({"object": "list", "data": DocumentOutputSerializer(documents, many=True).data})

    @extend_schema(
        request={
            "multipart/form-data": inline_serializer(
                "DocumentUpload",
                {"file": serializers.FileField(), "title": serializers.CharField(required=False)},
            ),
            "application/json": DocumentJsonInputSerializer,
        },
        responses={202: DocumentOutputSerializer, 200: DocumentOutputSerializer},
    )
    def post(self, request, kb_id: str):
        knowledge_base = selectors.knowledge_base_get(knowledge_base_id=kb_id)
        if request.content_type.startswith("multipart/"):
            limit = services.plan_limits().max_upload_bytes
            declared = int(request.META.get("CONTENT_LENGTH") or 0)
            if declared > limit + MULTIPART_OVERHEAD_BYTES:
                raise services.PayloadTooLarge(
                    f"The upload is {declared:,} bytes; your plan allows files up to {limit:,} bytes.", param="file"
                )
            document, created = self._create_from_upload(request, knowledge_base)
        else:
            serializer = DocumentJsonInputSerializer(data=request.data)
            serializer.is_valid(raise_exception=True)
            data = serializer.validated_data
            if "url" in data:
                document, created = services.document_create(
                    knowledge_base=knowledge_base, title=data.get("title", ""), url=data["url"]
                )
            else:
                document, created = services.document_create(
                    knowledge_base=knowledge_base,
                    title=data.get("title", ""),
                    data=data["text"].encode("utf-8", errors="surrogatepass"),
                    source=Document.Source.TEXT,
                )
        return Response(
            DocumentOutputSerializer(document).data,
            status=status.HTTP_202_ACCEPTED if created else status.HTTP_200_OK,
        )

    @staticmethod
    def _create_from_upload(request, knowledge_base):
        unknown = sorted(set(request.data) - {"file", "title"})
        if unknown:
            raise ValidationFailed("Unknown field.", param=unknown[0])
        upload = request.FILES.get("file")
        if upload is None:
            raise ValidationFailed("Send the document as a multipart field named 'file'.", param="file")
        limit = services.plan_limits().max_upload_bytes
        if upload.size > limit:
            raise services.PayloadTooLarge(
                f"The file is {upload.size:,} bytes; your plan allows files up to {limit:,} bytes.", param="file"
            )
        return services.document_create(
            knowledge_base=knowledge_base,
            title=str(request.data.get("title", "")),
            data=upload.read(),
            filename=upload.name or "",
            declared_type=upload.content_type or "",
        )


class DocumentDetailApi(TenantAPIView):
    required_scopes = {"GET": "knowledge:read", "DELETE": "knowledge:write"}

    @extend_schema(responses=DocumentOutputSerializer)
    def get(self, request, document_id: str):
        return Response(DocumentOutputSerializer(selectors.document_get(document_id=document_id)).data)

    @extend_schema(responses={204: None})
    def delete(self, request, document_id: str):
        services.document_delete(document=selectors.document_get(document_id=document_id))
        return Response(status=status.HTTP_204_NO_CONTENT)


class DocumentReingestApi(TenantAPIView):
    required_scopes = {"POST": "knowledge:write"}

    @extend_schema(
        request=None,
        responses={
            202: DocumentOutputSerializer,
            409: OpenApiResponse(description="The document is being ingested already."),
        },
    )
    def post(self, request, document_id: str):
        document = services.document_reingest(document=selectors.document_get(document_id=document_id))
        return Response(DocumentOutputSerializer(document).data, status=status.HTTP_202_ACCEPTED)


# --- search -------------------------------------------------------------------------------------


class SearchResultSerializer(serializers.Serializer):
    chunk_id = serializers.IntegerField()
    document_id = serializers.IntegerField()
    title = serializers.CharField()
    text = serializers.CharField()
    page = serializers.IntegerField(allow_null=True)
    heading = serializers.CharField()
    score = serializers.FloatField()
    similarity = serializers.FloatField(allow_null=True)
    vector_rank = serializers.IntegerField(allow_null=True)
    text_rank = serializers.IntegerField(allow_null=True)


class KnowledgeBaseSearchApi(TenantAPIView):
    required_scopes = {"GET": "knowledge:read"}

    class QuerySerializer(StrictQuerySerializer):
        q = serializers.CharField(max_length=2000)
        k = serializers.IntegerField(min_value=1, max_value=SEARCH_MAX_K, default=5)
        document = serializers.CharField(required=False, help_text="Comma-separated document ids to search within.")

        def validate_document(self, value: str) -> list[int]:
            try:
                ids = [int(part) for part in value.split(",") if part.strip()]
            except ValueError:
                raise serializers.ValidationError("Must be comma-separated document ids.") from None
            if not ids or len(ids) > 100 or min(ids) < 1:
                raise serializers.ValidationError("Must be 1 to 100 positive document ids.")
            return ids

    @extend_schema(
        parameters=[
            OpenApiParameter("q", str, required=True),
            OpenApiParameter("k", int, required=False),
            OpenApiParameter("document", str, required=False),
        ],
        responses=inline_serializer(
            "SearchResults", {"object": serializers.CharField(), "data": SearchResultSerializer(many=True)}
        ),
    )
    def get(self, request, kb_id: str):
        knowledge_base = selectors.knowledge_base_get(knowledge_base_id=kb_id)
        query = self.QuerySerializer(data=request.query_params.dict())
        query.is_valid(raise_exception=True)
        results = retrieve(
            knowledge_base_ids=[knowledge_base.pk],
            query=query.validated_data["q"],
            limit=query.validated_data["k"],
            document_ids=query.validated_data.get("document"),
        )
        data = SearchResultSerializer(results, many=True).data
        return Response({"object": "list", "data": data})
