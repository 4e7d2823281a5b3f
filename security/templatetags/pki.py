"""``{% device_certificates device as certs %}``: the device page's certificate card, in two queries."""

from django import template

from security.models import DeviceCertificate

register = template.Library()


@register.simple_tag
def device_certificates(device) -> list[DeviceCertificate]:
    return list(DeviceCertificate.objects.filter(client_id=device.client_id).order_by("-created", "-id")[:50])
