from django.urls import path  # noqa: F401

from security.views import broker as broker_views
from security.views.audit import AuditLogView

urlpatterns: list = [
    # --- audit log pages (UI work) ---
    path("audit/", AuditLogView.as_view(), name="audit-log"),
    # --- broker policy, credentials and broker state pages (broker-enforcement work) ---
    path("policy/", broker_views.PolicyView.as_view(), name="broker-policy"),
    path("policy/sync/", broker_views.PolicySyncView.as_view(), name="broker-policy-sync"),
    path(
        "devices/<str:client_id>/credentials/issue/",
        broker_views.CredentialIssueView.as_view(),
        name="device-credential-issue",
    ),
]
