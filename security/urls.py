from django.urls import include, path  # noqa: F401

from security.views import alerts as alert_views
from security.views import broker as broker_views
from security.views import payload_keys as payload_key_views
from security.views import pki as pki_views
from security.views import posture as posture_views
from security.views import revocation as revocation_views
from security.views import rotation as rotation_views
from security.views import rotation_campaigns as campaign_views
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
    # --- revocation and quarantine (issue 5); alerts link to devices/<client_id>/revoke/?alert=<id> ---
    path("devices/<str:client_id>/revoke/", revocation_views.DeviceRevokeView.as_view(), name="device-revoke"),
    path(
        "devices/<str:client_id>/quarantine/", revocation_views.DeviceQuarantineView.as_view(), name="device-quarantine"
    ),
    path("devices/<str:client_id>/reinstate/", revocation_views.DeviceReinstateView.as_view(), name="device-reinstate"),
    path(
        "devices/<str:client_id>/security/",
        revocation_views.DeviceSecurityPanelView.as_view(),
        name="device-security-panel",
    ),
    path("bulk-actions/new/", revocation_views.BulkNewView.as_view(), name="bulk-action-new"),
    path("bulk-actions/<int:pk>/", revocation_views.BulkDetailView.as_view(), name="bulk-action-detail"),
    # --- rotation campaigns (issue 7) ---
    path("rotation-campaigns/", campaign_views.CampaignListView.as_view(), name="rotation-campaign-list"),
    path("rotation-campaigns/new/", campaign_views.CampaignNewView.as_view(), name="rotation-campaign-new"),
    path("rotation-campaigns/<int:pk>/", campaign_views.CampaignDetailView.as_view(), name="rotation-campaign-detail"),
    path(
        "rotation-campaigns/<int:pk>/pause/",
        campaign_views.CampaignActView.as_view(action="pause"),
        name="rotation-campaign-pause",
    ),
    path(
        "rotation-campaigns/<int:pk>/resume/",
        campaign_views.CampaignActView.as_view(action="resume"),
        name="rotation-campaign-resume",
    ),
    path(
        "rotation-campaigns/<int:pk>/abort/",
        campaign_views.CampaignActView.as_view(action="abort"),
        name="rotation-campaign-abort",
    ),
    # --- credential rotation (issue 7, the handover): pages, device fragment, policies ---
    path("rotations/", rotation_views.RotationListView.as_view(), name="rotation-list"),
    path("rotations/card/", rotation_views.RotationOverviewCardView.as_view(), name="rotation-overview-card"),
    path("rotations/bulk/", rotation_views.BulkRotateView.as_view(), name="rotation-bulk"),
    path("rotations/<int:pk>/cancel/", rotation_views.RotationCancelView.as_view(), name="rotation-cancel"),
    path("rotations/policies/", rotation_views.PolicyListView.as_view(), name="rotation-policies"),
    path("rotations/policies/new/", rotation_views.PolicyFormView.as_view(), name="rotation-policy-add"),
    path("rotations/policies/<int:pk>/", rotation_views.PolicyFormView.as_view(), name="rotation-policy-edit"),
    path(
        "rotations/policies/<int:pk>/delete/", rotation_views.PolicyDeleteView.as_view(), name="rotation-policy-delete"
    ),
    path("rotations/policies/<int:pk>/run/", rotation_views.PolicyRunView.as_view(), name="rotation-policy-run"),
    path("devices/<str:client_id>/rotate/", rotation_views.DeviceRotateView.as_view(), name="device-rotate"),
    path(
        "devices/<str:client_id>/rotations/",
        rotation_views.DeviceRotationsFragmentView.as_view(),
        name="device-rotations",
    ),
    # --- payload encryption (docs/device-protocol.md, "Payload encryption") ---
    path(
        "devices/<str:client_id>/payload-key/",
        payload_key_views.DevicePayloadKeyFragmentView.as_view(),
        name="device-payload-key",
    ),
    path(
        "devices/<str:client_id>/payload-key/issue/",
        payload_key_views.PayloadKeyIssueView.as_view(),
        name="device-payload-key-issue",
    ),
    path(
        "devices/<str:client_id>/payload-key/require/",
        payload_key_views.PayloadKeyRequireView.as_view(),
        name="device-payload-key-require",
    ),
    # --- pki (issue 8) ---
    path("pki/", pki_views.PkiView.as_view(), name="pki"),
    path("pki/<str:name>.pem", pki_views.PkiDownloadView.as_view(), name="pki-download"),
    path(
        "devices/<str:client_id>/certificates/",
        pki_views.DeviceCertificatesFragmentView.as_view(),
        name="device-certificates",
    ),
    path(
        "devices/<str:client_id>/certificates/issue/",
        pki_views.DeviceCertificateIssueView.as_view(),
        name="device-certificate-issue",
    ),
    path(
        "devices/<str:client_id>/certificates/bundle/",
        pki_views.DeviceCertificateBundleView.as_view(),
        name="device-certificate-bundle",
    ),
    path(
        "devices/<str:client_id>/certificates/<str:serial>/revoke/",
        pki_views.DeviceCertificateRevokeView.as_view(),
        name="device-certificate-revoke",
    ),
    # --- alerts (issue 6, detection) ---
    path("alerts/", alert_views.AlertListView.as_view(), name="alert-list"),
    path("alerts/<int:pk>/", alert_views.AlertDetailView.as_view(), name="alert-detail"),
    path(
        "alerts/<int:pk>/acknowledge/", alert_views.AlertActView.as_view(action="acknowledge"), name="alert-acknowledge"
    ),
    path("alerts/<int:pk>/resolve/", alert_views.AlertActView.as_view(action="resolve"), name="alert-resolve"),
    path("alerts/card/", alert_views.AlertOverviewCardView.as_view(), name="alert-overview-card"),
    path("devices/<str:client_id>/alerts/", alert_views.DeviceAlertsFragmentView.as_view(), name="device-alerts"),
    # --- posture audit (docs/posture.md) ---
    path("posture/", posture_views.PostureView.as_view(), name="posture"),
    path("posture/<int:pk>/", posture_views.PostureView.as_view(), name="posture-report"),
    path("posture/run/", posture_views.PostureRunView.as_view(), name="posture-run"),
    path("posture/<int:pk>/progress/", posture_views.PostureProgressView.as_view(), name="posture-progress"),
    path("posture/card/", posture_views.PostureOverviewCardView.as_view(), name="posture-overview-card"),
    # --- firmware registry (docs/firmware.md) ---
    path("", include("devices.firmware.urls")),
]
