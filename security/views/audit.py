"""The audit log page. Read-only: the log is append-only, so there is no edit or delete anywhere."""

from __future__ import annotations

from django.conf import settings
from django.core.paginator import Paginator
from django.shortcuts import render
from django.views import View

from security.models import AuditEvent
from security.permissions import RoleRequiredMixin
from security.selectors import audit_event_list


def _display(value) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "(none)"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def event_changes(event: AuditEvent) -> list[tuple[str, str, str]]:
    """(field, before, after) for every field the event changed, ready to show."""
    before, after = event.before or {}, event.after or {}
    return [(field, _display(before.get(field)), _display(after.get(field))) for field in event.changed_fields]


class AuditLogView(RoleRequiredMixin, View):
    permission_required = "security.view_auditevent"
    http_method_names = ["get", "head", "options"]

    def get(self, request):
        filterset = audit_event_list(user=request.user, filters=request.GET)
        page = Paginator(filterset.qs, settings.FLEET_PAGE_SIZE).get_page(request.GET.get("page"))
        return render(
            request,
            "security/audit_log.html",
            {
                "filterset": filterset,
                "page": page,
                "events": [(event, event_changes(event)) for event in page.object_list],
                "filtered": any(v for k, v in request.GET.items() if k != "page"),
            },
        )
