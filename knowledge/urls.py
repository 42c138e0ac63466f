from django.urls import path

from knowledge import apis, views

urlpatterns = [
    path("api/v1/knowledge-bases/", apis.KnowledgeBaseListCreateApi.as_view(), name="knowledge-bases"),
    path("api/v1/knowledge-bases/<str:kb_id>/", apis.KnowledgeBaseDetailApi.as_view(), name="knowledge-base-detail"),
    path("api/v1/knowledge-bases/<str:kb_id>/documents/", apis.DocumentListCreateApi.as_view(), name="documents"),
    path("api/v1/knowledge-bases/<str:kb_id>/search/", apis.KnowledgeBaseSearchApi.as_view(), name="knowledge-search"),
    path("api/v1/documents/<str:document_id>/", apis.DocumentDetailApi.as_view(), name="document-detail"),
    path("api/v1/documents/<str:document_id>/reingest/", apis.DocumentReingestApi.as_view(), name="document-reingest"),
]

# The admin site's pages (tenant hosts only).
site_urlpatterns = [
    path("knowledge/", views.knowledge_base_list, name="site-knowledge"),
    path("knowledge/<int:knowledge_base_id>/", views.knowledge_base_detail, name="site-knowledge-base"),
    path("knowledge/<int:knowledge_base_id>/delete/", views.knowledge_base_delete, name="site-knowledge-base-delete"),
    path("knowledge/<int:knowledge_base_id>/documents/", views.document_fragment, name="site-knowledge-documents"),
    path("knowledge/<int:knowledge_base_id>/upload/", views.document_upload, name="site-document-upload"),
    path("knowledge/<int:knowledge_base_id>/text/", views.document_add_text, name="site-document-text"),
    path("knowledge/<int:knowledge_base_id>/url/", views.document_add_url, name="site-document-url"),
    path("knowledge/documents/<int:document_id>/delete/", views.document_delete, name="site-document-delete"),
    path("knowledge/documents/<int:document_id>/reingest/", views.document_reingest, name="site-document-reingest"),
]
