"""Admin-site pages of the knowledge app: knowledge bases, documents (upload, paste, URL, live
status, delete, re-ingest) and search with scores. Thin: parse a form, call a service, render."""

from __future__ import annotations

from django import forms
from django.contrib import messages
from django.http import HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from knowledge import selectors, services
from knowledge.models import Document
from knowledge.retrieval import retrieve
from tenants.errors import ParleyError
from tenants.views import SiteRequest, forbidden, form_error, site_page

DOCUMENTS_SHOWN = 500
SEARCH_RESULTS = 8
FILES_PER_UPLOAD = 20


class KnowledgeBaseForm(forms.Form):
    name = forms.CharField(max_length=200)
    description = forms.CharField(required=False, max_length=5000, widget=forms.Textarea(attrs={"rows": 2}))


class MultipleFileInput(forms.ClearableFileInput):
    allow_multiple_selected = True


class MultipleFileField(forms.FileField):
    """Several files from one input (Django's documented pattern)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("widget", MultipleFileInput())
        # An empty file is refused by the service, per file, so the others still go in.
        kwargs.setdefault("allow_empty_file", True)
        super().__init__(*args, **kwargs)

    def clean(self, data, initial=None):
        files = data if isinstance(data, list | tuple) else [data]
        if len(files) > FILES_PER_UPLOAD:
            raise forms.ValidationError(f"Upload at most {FILES_PER_UPLOAD} files at a time.")
        return [super(MultipleFileField, self).clean(file, initial) for file in files]


class UploadForm(forms.Form):
    files = MultipleFileField(  # type: ignore[assignment]  # django-stubs: declared fields leave the class (metaclass), no clash with BaseForm.files
        label="Files", help_text="PDF, Word, HTML, Markdown, CSV or text; several at once, or drop them here."
    )


class TextForm(forms.Form):
    title = forms.CharField(max_length=500)
    text = forms.CharField(widget=forms.Textarea(attrs={"rows": 6}), strip=False)


class UrlForm(forms.Form):
    url = forms.URLField(max_length=2048, label="Page address", assume_scheme="https")
    title = forms.CharField(max_length=500, required=False, help_text="Optional; the page's own title otherwise.")


class SearchForm(forms.Form):
    q = forms.CharField(max_length=2000, label="Search this knowledge base")


@site_page()
def knowledge_base_list(request: SiteRequest) -> HttpResponse:
    form = KnowledgeBaseForm(request.POST or None)
    if request.method == "POST":
        if not request.membership.is_admin:
            return forbidden(request, "Only owners and admins can create knowledge bases.")
        if form.is_valid():
            try:
                knowledge_base = services.knowledge_base_create(**form.cleaned_data)
            except ParleyError as error:
                form_error(form, error)
            else:
                messages.success(request, f"Knowledge base “{knowledge_base.name}” created.")
                return redirect("site-knowledge-base", knowledge_base_id=knowledge_base.pk)
    return render(
        request,
        "site/knowledge/list.html",
        {"knowledge_bases": selectors.knowledge_base_list(), "form": form, "nav": "knowledge"},
        status=400 if form.errors else 200,
    )


def _documents_context(knowledge_base) -> dict:
    documents = list(selectors.document_list(knowledge_base=knowledge_base)[:DOCUMENTS_SHOWN])
    busy = any(document.status in (Document.Status.QUEUED, Document.Status.PROCESSING) for document in documents)
    return {"knowledge_base": knowledge_base, "documents": documents, "is_busy": busy}


def _detail(request: SiteRequest, knowledge_base, **forms_and_status) -> HttpResponse:
    status = forms_and_status.pop("status", 200)
    search = SearchForm(request.GET or None)
    results = None
    if search.is_valid():
        results = retrieve(knowledge_base_ids=[knowledge_base.pk], query=search.cleaned_data["q"], limit=SEARCH_RESULTS)
    context = {
        **_documents_context(knowledge_base),
        "upload_form": forms_and_status.get("upload_form") or UploadForm(),
        "text_form": forms_and_status.get("text_form") or TextForm(),
        "url_form": forms_and_status.get("url_form") or UrlForm(),
        "search_form": search,
        "results": results,
        "nav": "knowledge",
    }
    return render(request, "site/knowledge/detail.html", context, status=status)


@site_page()
def knowledge_base_detail(request: SiteRequest, knowledge_base_id: int) -> HttpResponse:
    return _detail(request, selectors.knowledge_base_get(knowledge_base_id=knowledge_base_id))


@site_page()
def document_fragment(request: SiteRequest, knowledge_base_id: int) -> HttpResponse:
    """The documents table alone, polled by the page while anything is queued or processing."""
    knowledge_base = selectors.knowledge_base_get(knowledge_base_id=knowledge_base_id)
    response = render(request, "site/knowledge/_documents.html", _documents_context(knowledge_base))
    response["Cache-Control"] = "no-store"
    return response


@site_page(admin=True)
@require_POST
def knowledge_base_delete(request: SiteRequest, knowledge_base_id: int) -> HttpResponse:
    knowledge_base = selectors.knowledge_base_get(knowledge_base_id=knowledge_base_id)
    services.knowledge_base_delete(knowledge_base=knowledge_base)
    messages.success(request, f"Knowledge base “{knowledge_base.name}” deleted.")
    return redirect("site-knowledge")


@site_page(admin=True)
@require_POST
def document_upload(request: SiteRequest, knowledge_base_id: int) -> HttpResponse:
    knowledge_base = selectors.knowledge_base_get(knowledge_base_id=knowledge_base_id)
    form = UploadForm(request.POST, request.FILES)
    if not form.is_valid():
        return _detail(request, knowledge_base, upload_form=form, status=400)
    accepted, refused = [], []
    # Each file stands alone: one refused file (too big, unsupported) does not lose the others.
    for upload in form.cleaned_data["files"]:
        try:
            document, created = services.document_create(
                knowledge_base=knowledge_base,
                data=upload.read(),
                filename=upload.name or "",
                declared_type=upload.content_type or "",
            )
        except ParleyError as error:
            refused.append(f"{upload.name}: {error.message}")
        else:
            accepted.append(document.title if created else f"{document.title} (already here)")
    if accepted:
        messages.success(request, f"Added: {', '.join(accepted)}.")
    for problem in refused:
        messages.error(request, problem)
    return redirect("site-knowledge-base", knowledge_base_id=knowledge_base.pk)


@site_page(admin=True)
@require_POST
def document_add_text(request: SiteRequest, knowledge_base_id: int) -> HttpResponse:
    knowledge_base = selectors.knowledge_base_get(knowledge_base_id=knowledge_base_id)
    form = TextForm(request.POST)
    if form.is_valid():
        try:
            document, _ = services.document_create(
                knowledge_base=knowledge_base,
                title=form.cleaned_data["title"],
                data=form.cleaned_data["text"].encode("utf-8", errors="surrogatepass"),
                source=Document.Source.TEXT,
            )
        except ParleyError as error:
            form_error(form, error, {"file": "text"})
        else:
            messages.success(request, f"Added “{document.title}”.")
            return redirect("site-knowledge-base", knowledge_base_id=knowledge_base.pk)
    return _detail(request, knowledge_base, text_form=form, status=400)


@site_page(admin=True)
@require_POST
def document_add_url(request: SiteRequest, knowledge_base_id: int) -> HttpResponse:
    knowledge_base = selectors.knowledge_base_get(knowledge_base_id=knowledge_base_id)
    form = UrlForm(request.POST)
    if form.is_valid():
        try:
            document, _ = services.document_create(
                knowledge_base=knowledge_base, title=form.cleaned_data["title"], url=form.cleaned_data["url"]
            )
        except ParleyError as error:
            form_error(form, error)
        else:
            messages.success(request, f"Added “{document.title}”; it is fetched in the background.")
            return redirect("site-knowledge-base", knowledge_base_id=knowledge_base.pk)
    return _detail(request, knowledge_base, url_form=form, status=400)


@site_page(admin=True)
@require_POST
def document_delete(request: SiteRequest, document_id: int) -> HttpResponse:
    document = selectors.document_get(document_id=document_id)
    services.document_delete(document=document)
    messages.success(request, f"Deleted “{document.title}”.")
    return redirect("site-knowledge-base", knowledge_base_id=document.knowledge_base_id)


@site_page(admin=True)
@require_POST
def document_reingest(request: SiteRequest, document_id: int) -> HttpResponse:
    document = selectors.document_get(document_id=document_id)
    try:
        services.document_reingest(document=document)
    except ParleyError as error:
        messages.error(request, error.message)
    else:
        messages.success(request, f"Re-ingesting “{document.title}”.")
    return redirect("site-knowledge-base", knowledge_base_id=document.knowledge_base_id)
