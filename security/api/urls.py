from django.urls import include, path  # noqa: F401

from security.api.views import broker as broker_api

urlpatterns: list = [
    # --- audit log API (API work) ---
    path("audit-log/", include("security.api.views.audit")),
    # --- policy, credentials API (broker-enforcement work) ---
    path("policy/", broker_api.PolicyView.as_view(), name="api-policy"),
    path("policy/sync/", broker_api.PolicySyncView.as_view(), name="api-policy-sync"),
    path(
        "devices/<str:client_id>/credentials/", broker_api.DeviceCredentialView.as_view(), name="api-device-credentials"
    ),
]
