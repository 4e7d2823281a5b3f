from django.conf import settings


def fleet(request):
    return {"FLEET_CLIENT_ID_PREFIX": settings.FLEET_CLIENT_ID_PREFIX}
