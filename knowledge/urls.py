from django.urls import path

from knowledge import apis

urlpatterns = [
    path("api/v1/knowledge-bases/", apis.KnowledgeBaseListCreateApi.as_view(), name="knowledge-bases"),
    path("api/v1/knowledge-bases/<str:kb_id>/", apis.KnowledgeBaseDetailApi.as_view(), name="knowledge-base-detail"),
    path("api/v1/knowledge-bases/<str:kb_id>/documents/", apis.DocumentListCreateApi.as_view(), name="documents"),
    path("api/v1/knowledge-bases/<str:kb_id>/search/", apis.KnowledgeBaseSearchApi.as_view(), name="knowledge-search"),
    path("api/v1/documents/<str:document_id>/", apis.DocumentDetailApi.as_view(), name="document-detail"),
    path("api/v1/documents/<str:document_id>/reingest/", apis.DocumentReingestApi.as_view(), name="document-reingest"),
]
