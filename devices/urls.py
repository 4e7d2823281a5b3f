from django.urls import path

from . import views

urlpatterns = [
    path("", views.OverviewView.as_view(), name="overview"),
    path("devices/", views.DeviceListView.as_view(), name="device-list"),
    path("devices/add/", views.DeviceFormView.as_view(), name="device-add"),
    path("devices/export.csv", views.DeviceExportView.as_view(), name="device-export"),
    path("devices/<str:client_id>/", views.DeviceDetailView.as_view(), name="device-detail"),
    path("devices/<str:client_id>/edit/", views.DeviceFormView.as_view(), name="device-edit"),
    path("devices/<str:client_id>/delete/", views.DeviceDeleteView.as_view(), name="device-delete"),
    path("models/", views.DeviceModelListView.as_view(), name="devicemodel-list"),
    path("models/add/", views.DeviceModelFormView.as_view(), name="devicemodel-add"),
    path("models/<int:pk>/edit/", views.DeviceModelFormView.as_view(), name="devicemodel-edit"),
    path("models/<int:pk>/delete/", views.DeviceModelDeleteView.as_view(), name="devicemodel-delete"),
    path("groups/", views.DeviceGroupListView.as_view(), name="devicegroup-list"),
    path("groups/add/", views.DeviceGroupFormView.as_view(), name="devicegroup-add"),
    path("groups/<int:pk>/edit/", views.DeviceGroupFormView.as_view(), name="devicegroup-edit"),
    path("groups/<int:pk>/delete/", views.DeviceGroupDeleteView.as_view(), name="devicegroup-delete"),
    path("imports/", views.ImportJobListView.as_view(), name="import-list"),
    path("imports/new/", views.ImportCreateView.as_view(), name="import-create"),
    path("imports/<int:pk>/", views.ImportJobDetailView.as_view(), name="import-detail"),
]
