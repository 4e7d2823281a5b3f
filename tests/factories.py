import factory
from django.contrib.auth import get_user_model

from devices.models import Device, DeviceGroup, DeviceModel

PASSWORD = "correct-horse-battery-staple"


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda u: f"{u.username}@example.test")
    password = factory.django.Password(PASSWORD)


class DeviceModelFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = DeviceModel
        django_get_or_create = ("name",)

    name = factory.Sequence(lambda n: f"Sensor-{n}")
    manufacturer = "Acme"


class DeviceGroupFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = DeviceGroup
        django_get_or_create = ("name",)

    name = factory.Sequence(lambda n: f"site-{n}")


class DeviceFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Device

    client_id = factory.Sequence(lambda n: f"device-{n:06d}")
    name = factory.Sequence(lambda n: f"Device {n}")
    model = factory.SubFactory(DeviceModelFactory)
    serial = factory.Sequence(lambda n: f"SN{n:08d}")
    firmware_version = "1.0.0"
