from rest_framework.routers import SimpleRouter

from .views import DeviceGroupViewSet, DeviceModelViewSet, DeviceViewSet, ImportJobViewSet

# SimpleRouter: no API root view and no format suffixes; /api/v1/ is shared with the security app's routes.
# Route names start with "api-": the browser UI uses the plain names (device-detail, ...).
router = SimpleRouter()
router.register("devices", DeviceViewSet, basename="api-device")
router.register("models", DeviceModelViewSet, basename="api-devicemodel")
router.register("groups", DeviceGroupViewSet, basename="api-devicegroup")
router.register("imports", ImportJobViewSet, basename="api-importjob")

urlpatterns = router.urls
