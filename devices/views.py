"""Browser pages for the inventory. Thin: read through selectors, change through services, render.

Every view passes the one permission gate (security.permissions.RoleRequiredMixin): anonymous users are
sent to the login page, signed-in users without the right role get 403.
"""

from __future__ import annotations

import csv

from django.conf import settings
from django.contrib import messages
from django.core.exceptions import ValidationError
from django.core.paginator import Page, Paginator
from django.db import IntegrityError
from django.forms import CheckboxSelectMultiple
from django.http import Http404, HttpRequest, HttpResponse, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.cache import patch_vary_headers
from django.views import View

from security.permissions import RoleRequiredMixin, user_can
from security.selectors import audit_events_for
from security.views.audit import event_changes

from . import selectors, services
from .forms import DeviceForm, DeviceGroupForm, DeviceModelForm, ImportUploadForm, add_service_errors
from .models import Device, DeviceGroup, DeviceModel

# (ordering key of DeviceFilterSet, column title); None: the column cannot be sorted.
DEVICE_COLUMNS = [
    ("client_id", "Client id"),
    ("name", "Name"),
    ("status", "Status"),
    ("model", "Model"),
    (None, "Groups"),
    ("firmware", "Firmware"),
    ("last_seen", "Last seen"),
]

CONFLICT_MESSAGE = (
    "The change conflicts with data saved at the same time (a duplicate name or id). Reload and try again."
)


def paginate(request: HttpRequest, queryset) -> Page:
    """One page of a list. get_page() turns a bad or out-of-range page number into a valid page."""
    return Paginator(queryset, settings.FLEET_PAGE_SIZE).get_page(request.GET.get("page"))


def wants_fragment(request: HttpRequest) -> bool:
    """An htmx request swaps part of the page; a history restore (back button after a cache miss)
    needs the whole page."""
    return request.headers.get("HX-Request") == "true" and request.headers.get("HX-History-Restore-Request") != "true"


def sort_columns(current: str) -> list[dict]:
    """Header links: a click sorts by the column, a second click reverses it."""
    columns = []
    for key, title in DEVICE_COLUMNS:
        direction = None
        if key and current == key:
            direction = "asc"
        elif key and current == f"-{key}":
            direction = "desc"
        columns.append(
            {"title": title, "key": key, "direction": direction, "next": f"-{key}" if direction == "asc" else key}
        )
    return columns


# --- overview and devices ---------------------------------------------------------------------------------


class OverviewView(RoleRequiredMixin, View):
    permission_required = "devices.view_device"

    def get(self, request):
        return render(request, "devices/overview.html", {"overview": selectors.fleet_overview()})


class DeviceListView(RoleRequiredMixin, View):
    permission_required = "devices.view_device"

    def get(self, request):
        filterset = selectors.device_list(user=request.user, filters=request.GET)
        fields = filterset.form.fields
        fields["status"].widget = CheckboxSelectMultiple(choices=Device.Status.choices)
        fields["model"].empty_label = fields["group"].empty_label = "Any"
        seen = fields["seen"]
        seen.empty_label = "Any time"
        seen.choices = [choice for choice in seen.choices if choice[0] != ""]  # rebuilt with the new empty label
        page = paginate(request, filterset.qs)
        context = {
            "filterset": filterset,
            "page": page,
            "columns": sort_columns(request.GET.get("ordering", "")),
            "ordering": request.GET.get("ordering", ""),
            "filtered": any(v for k, v in request.GET.items() if k not in {"page", "ordering"}),
        }
        template = "devices/_device_table.html" if wants_fragment(request) else "devices/device_list.html"
        response = render(request, template, context)
        patch_vary_headers(response, ["HX-Request"])
        return response


def get_device(client_id: str) -> Device:
    try:
        return selectors.device_get(client_id=client_id)
    except Device.DoesNotExist:
        raise Http404(f"There is no device {client_id!r} in the inventory.") from None


class DeviceDetailView(RoleRequiredMixin, View):
    permission_required = "devices.view_device"

    def get(self, request, client_id):
        device = get_device(client_id)
        events = list(audit_events_for(object_type="device", object_id=device.client_id))
        return render(
            request,
            "devices/device_detail.html",
            {"device": device, "events": [(event, event_changes(event)) for event in events]},
        )


class DeviceFormView(RoleRequiredMixin, View):
    """Create (no client_id in the URL) or edit a device through DeviceForm and the device services."""

    template_name = "devices/device_form.html"

    def get_permission_required(self):
        return "devices.change_device" if "client_id" in self.kwargs else "devices.add_device"

    def get_instance(self) -> Device | None:
        return get_device(self.kwargs["client_id"]) if "client_id" in self.kwargs else None

    def render_form(self, form, status=200):
        return render(self.request, self.template_name, {"form": form, "device": form.instance}, status=status)

    def get(self, request, **kwargs):
        return self.render_form(DeviceForm(instance=self.get_instance()))

    def post(self, request, **kwargs):
        instance = self.get_instance()
        form = DeviceForm(request.POST, instance=instance)
        if form.is_valid():
            try:
                device = form.save(actor=request.user)
            except ValidationError as exc:
                add_service_errors(form, exc)
            except IntegrityError:
                form.add_error(None, CONFLICT_MESSAGE)
            else:
                verb = "added" if instance is None else "saved"
                messages.success(request, f"Device {device.client_id} {verb}.")
                return redirect("device-detail", client_id=device.client_id)
        return self.render_form(form, status=400)


class DeviceDeleteView(RoleRequiredMixin, View):
    permission_required = "devices.delete_device"

    def get(self, request, client_id):
        return render(request, "devices/device_confirm_delete.html", {"device": get_device(client_id)})

    def post(self, request, client_id):
        device = get_device(client_id)
        try:
            services.device_delete(actor=request.user, device=device)
        except ValidationError as exc:
            return render(
                request,
                "devices/device_confirm_delete.html",
                {"device": device, "error": " ".join(exc.messages)},
                status=409,
            )
        messages.success(request, f"Device {client_id} deleted. Its history stays in the audit log.")
        return redirect("device-list")


class Echo:
    """csv.writer writes into this and gets the line back, so rows can be streamed one by one."""

    def write(self, value: str) -> str:
        return value


class DeviceExportView(RoleRequiredMixin, View):
    """The devices the list shows with the same filters, as CSV in the import's columns; streamed, so
    100,000 devices never sit in memory."""

    permission_required = "devices.export_device"

    def get(self, request):
        filterset = selectors.device_list(user=request.user, filters=request.GET)
        writer = csv.writer(Echo())
        rows = services.device_export_rows(filterset.qs)
        response = StreamingHttpResponse((writer.writerow(row) for row in rows), content_type="text/csv; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="devices-{timezone.now():%Y%m%d-%H%M%S}.csv"'
        return response


# --- device models and groups -----------------------------------------------------------------------------


class CatalogMixin(RoleRequiredMixin):
    """Device models and groups share their pages; subclasses name the model, form and selector."""

    model: type[DeviceModel] | type[DeviceGroup]
    form_class: type
    action = "view"

    def get_permission_required(self):
        return f"devices.{self.action}_{self.model._meta.model_name}"

    @property
    def kind(self) -> dict:
        name = self.model._meta.model_name
        return {
            "name": name,
            "verbose_name": self.model._meta.verbose_name,
            "verbose_name_plural": "device models" if name == "devicemodel" else "groups",
            "list_url": reverse(f"{name}-list"),
            "add_url": reverse(f"{name}-add"),
            "edit_url_name": f"{name}-edit",
            "delete_url_name": f"{name}-delete",
            "can_add": user_can(self.request.user, f"devices.add_{name}"),
            "can_change": user_can(self.request.user, f"devices.change_{name}"),
            "can_delete": user_can(self.request.user, f"devices.delete_{name}"),
            "filter_param": "model" if name == "devicemodel" else "group",
        }

    def get_object(self):
        try:
            return self.model.objects.get(pk=self.kwargs["pk"])
        except self.model.DoesNotExist:
            raise Http404(f"There is no such {self.model._meta.verbose_name}.") from None


class CatalogListView(CatalogMixin, View):
    selector = None

    def get(self, request):
        page = paginate(request, self.selector())
        return render(request, "devices/catalog_list.html", {"kind": self.kind, "page": page})


class CatalogFormView(CatalogMixin, View):
    def get_permission_required(self):
        return f"devices.{'change' if 'pk' in self.kwargs else 'add'}_{self.model._meta.model_name}"

    def render_form(self, form, status=200):
        return render(
            self.request,
            "devices/catalog_form.html",
            {"kind": self.kind, "form": form, "object": form.instance},
            status=status,
        )

    def get(self, request, **kwargs):
        instance = self.get_object() if "pk" in kwargs else None
        return self.render_form(self.form_class(instance=instance))

    def post(self, request, **kwargs):
        instance = self.get_object() if "pk" in kwargs else None
        form = self.form_class(request.POST, instance=instance)
        if form.is_valid():
            try:
                obj = form.save(actor=request.user)
            except ValidationError as exc:
                add_service_errors(form, exc)
            except IntegrityError:
                form.add_error(None, CONFLICT_MESSAGE)
            else:
                messages.success(request, f"{self.model._meta.verbose_name.capitalize()} {obj.name} saved.")
                return redirect(f"{self.model._meta.model_name}-list")
        return self.render_form(form, status=400)


class CatalogDeleteView(CatalogMixin, View):
    action = "delete"

    def render_confirm(self, obj, error="", status=200):
        return render(
            self.request,
            "devices/catalog_confirm_delete.html",
            {"kind": self.kind, "object": obj, "device_count": obj.devices.count(), "error": error},
            status=status,
        )

    def get(self, request, pk):
        return self.render_confirm(self.get_object())

    def post(self, request, pk):
        obj = self.get_object()
        try:
            services.catalog_delete(actor=request.user, instance=obj)
        except ValidationError as exc:
            return self.render_confirm(obj, error=" ".join(exc.messages), status=409)
        messages.success(request, f"{self.model._meta.verbose_name.capitalize()} {obj.name} deleted.")
        return redirect(f"{self.model._meta.model_name}-list")


class DeviceModelListView(CatalogListView):
    model, selector = DeviceModel, staticmethod(selectors.devicemodel_list)


class DeviceModelFormView(CatalogFormView):
    model, form_class = DeviceModel, DeviceModelForm


class DeviceModelDeleteView(CatalogDeleteView):
    model = DeviceModel


class DeviceGroupListView(CatalogListView):
    model, selector = DeviceGroup, staticmethod(selectors.devicegroup_list)


class DeviceGroupFormView(CatalogFormView):
    model, form_class = DeviceGroup, DeviceGroupForm


class DeviceGroupDeleteView(CatalogDeleteView):
    model = DeviceGroup


# --- CSV import -------------------------------------------------------------------------------------------


class ImportCreateView(RoleRequiredMixin, View):
    permission_required = ("devices.import_device", "devices.add_importjob")

    def render_form(self, form, status=200):
        return render(
            self.request,
            "devices/import_form.html",
            {"form": form, "columns": services.CSV_COLUMNS, "max_bytes": settings.FLEET_IMPORT_MAX_BYTES},
            status=status,
        )

    def get(self, request):
        return self.render_form(ImportUploadForm())

    def post(self, request):
        form = ImportUploadForm(request.POST, request.FILES)
        if not form.is_valid():
            return self.render_form(form, status=400)
        job = services.import_job_create(
            actor=request.user, filename=form.cleaned_data["file"].name, content=form.cleaned_data["content"]
        )
        return redirect("import-detail", pk=job.pk)


class ImportJobListView(RoleRequiredMixin, View):
    permission_required = "devices.view_importjob"

    def get(self, request):
        page = paginate(request, selectors.import_job_list(user=request.user))
        return render(request, "devices/import_list.html", {"page": page})


class ImportJobDetailView(RoleRequiredMixin, View):
    """The job page polls itself (htmx, every second) until the worker has finished."""

    permission_required = "devices.view_importjob"

    def get(self, request, pk) -> HttpResponse:
        job = selectors.import_job_list(user=request.user).filter(pk=pk).first()
        if job is None:
            raise Http404("There is no such import.")
        template = "devices/_import_status.html" if wants_fragment(request) else "devices/import_detail.html"
        return render(request, template, {"job": job})
