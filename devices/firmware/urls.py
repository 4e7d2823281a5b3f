from django.urls import path

from . import views

urlpatterns = [
    path("firmware/", views.FirmwareListView.as_view(), name="firmware-list"),
    path("firmware/signing-key/new/", views.SigningKeyCreateView.as_view(), name="firmware-key-create"),
    path("firmware/images/<str:sha256>.bin", views.FirmwareImageView.as_view(), name="firmware-image"),
    path("firmware/<int:pk>/", views.FirmwareDetailView.as_view(), name="firmware-detail"),
    path("firmware/<int:pk>/offer/", views.FirmwareOfferView.as_view(), name="firmware-offer"),
    path("firmware/<int:pk>/withdraw/", views.FirmwareActView.as_view(action="withdraw"), name="firmware-withdraw"),
    path(
        "firmware/<int:pk>/vulnerable/", views.FirmwareActView.as_view(action="vulnerable"), name="firmware-vulnerable"
    ),
    path("devices/<str:client_id>/firmware/", views.DeviceFirmwareView.as_view(), name="device-firmware"),
]
