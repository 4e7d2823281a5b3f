from django.urls import include, path  # noqa: F401

from security.api.views import broker as broker_api
from security.api.views import payload_keys as payload_keys_api
from security.api.views import pki as pki_api
from security.api.views import posture as posture_api
from security.api.views import revocation as revocation_api
from security.api.views import rotation as rotation_api

urlpatterns: list = [
    # --- audit log API (API work) ---
    path("audit-log/", include("security.api.views.audit")),
    # --- policy, credentials API (broker-enforcement work) ---
    path("policy/", broker_api.PolicyView.as_view(), name="api-policy"),
    path("policy/sync/", broker_api.PolicySyncView.as_view(), name="api-policy-sync"),
    path(
        "devices/<str:client_id>/credentials/", broker_api.DeviceCredentialView.as_view(), name="api-device-credentials"
    ),
    # --- revocation and quarantine (issue 5) ---
    path("devices/bulk/revoke/", revocation_api.BulkRevokeView.as_view(), name="api-bulk-revoke"),
    path("devices/bulk/quarantine/", revocation_api.BulkQuarantineView.as_view(), name="api-bulk-quarantine"),
    path("bulk-actions/<int:pk>/", revocation_api.BulkActionDetailView.as_view(), name="api-bulk-action-detail"),
    path("devices/<str:client_id>/revoke/", revocation_api.DeviceRevokeView.as_view(), name="api-device-revoke"),
    path(
        "devices/<str:client_id>/quarantine/",
        revocation_api.DeviceQuarantineView.as_view(),
        name="api-device-quarantine",
    ),
    path(
        "devices/<str:client_id>/reinstate/", revocation_api.DeviceReinstateView.as_view(), name="api-device-reinstate"
    ),
    path("device-actions/<int:pk>/", revocation_api.DeviceActionDetailView.as_view(), name="api-device-action-detail"),
    # --- rotation campaigns (issue 7) ---
    path("rotation-campaigns/", include("security.api.views.rotation_campaigns")),
    # --- credential rotation (issue 7, the handover) ---
    path("devices/<str:client_id>/rotate/", rotation_api.DeviceRotateView.as_view(), name="api-device-rotate"),
    path("rotations/", rotation_api.RotationListView.as_view(), name="api-rotation-list"),
    path("rotations/<int:pk>/", rotation_api.RotationDetailView.as_view(), name="api-rotation-detail"),
    # --- pki (issue 8) ---
    path("pki/ca/", pki_api.PkiCaView.as_view(), name="api-pki-ca"),
    path(
        "devices/<str:client_id>/certificates/",
        pki_api.DeviceCertificatesView.as_view(),
        name="api-device-certificates",
    ),
    path(
        "devices/<str:client_id>/certificates/bundle/",
        pki_api.DeviceCertificateBundleView.as_view(),
        name="api-device-certificate-bundle",
    ),
    path(
        "devices/<str:client_id>/certificates/<str:serial>/revoke/",
        pki_api.DeviceCertificateRevokeView.as_view(),
        name="api-device-certificate-revoke",
    ),
    # --- payload encryption (docs/device-protocol.md, "Payload encryption") ---
    path(
        "devices/<str:client_id>/payload-key/",
        payload_keys_api.DevicePayloadKeyView.as_view(),
        name="api-device-payload-key",
    ),
    # --- alerts (issue 6, detection) ---
    path("alerts/", include("security.api.views.alerts")),
    # --- posture audit (docs/posture.md) ---
    path("posture/", posture_api.PostureView.as_view(), name="api-posture"),
    path("posture/reports/", posture_api.PostureReportListView.as_view(), name="api-posture-reports"),
    path("posture/run/", posture_api.PostureRunView.as_view(), name="api-posture-run"),
    # --- firmware registry (docs/firmware.md) ---
    path("", include("devices.firmware.api")),
]
