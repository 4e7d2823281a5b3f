"""Firmware offers are accepted only with a valid Ed25519 signature over the image digest; certificate renewal
makes the key on the device and installs only a certificate for that key and that client id."""

import datetime
import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from fleetkeeper_device import protocol
from fleetkeeper_device.certificates import CertificateRejected, check_certificate, make_key_and_csr
from fleetkeeper_device.firmware import (
    FirmwareOffer,
    FirmwareRejected,
    is_downgrade,
    load_public_key,
    sign_digest,
    verify_offer,
)

IMAGE = b"\x7fELF firmware image " * 1000


@pytest.fixture(scope="module")
def signing_key():
    return Ed25519PrivateKey.generate()


def offer_for(image, key, **overrides):
    digest = hashlib.sha256(image).hexdigest()
    message = {
        "id": "fw-1",
        "version": "2.0.0",
        "url": "https://firmware.example.test/image.bin",
        "size": len(image),
        "sha256": digest,
        "signature": sign_digest(key, digest),
        **overrides,
    }
    # What the console would send must be a valid protocol message.
    protocol.encode("firmware_offer", **message)
    return FirmwareOffer.from_message(message)


def test_a_correctly_signed_offer_verifies_and_its_image_checks_out(signing_key):
    offer = offer_for(IMAGE, signing_key)
    # What the device application is handed to decide on: the offer as the console sent it.
    assert (offer.message_id, offer.version, offer.url) == ("fw-1", "2.0.0", "https://firmware.example.test/image.bin")
    assert offer.size == len(IMAGE) and offer.sha256 == hashlib.sha256(IMAGE).hexdigest()
    assert verify_offer(offer, signing_key.public_key()) is None  # verifies: no FirmwareRejected
    assert offer.check_image(IMAGE) is None  # the downloaded image is the signed one
    # The same checks on the same offer do refuse: one flipped byte of the image, or the signature of another digest.
    with pytest.raises(FirmwareRejected, match="digest does not match"):
        offer.check_image(IMAGE[:-1] + b"\x00")
    forged = FirmwareOffer(**{**offer.__dict__, "signature": sign_digest(signing_key, "00" * 32)})
    with pytest.raises(FirmwareRejected, match="does not verify"):
        verify_offer(forged, signing_key.public_key())


def test_an_offer_signed_by_another_key_is_refused(signing_key):
    offer = offer_for(IMAGE, Ed25519PrivateKey.generate())
    with pytest.raises(FirmwareRejected, match="does not verify"):
        verify_offer(offer, signing_key.public_key())


def test_an_offer_whose_digest_was_swapped_is_refused(signing_key):
    genuine = offer_for(IMAGE, signing_key)
    tampered = FirmwareOffer(**{**genuine.__dict__, "sha256": hashlib.sha256(b"evil").hexdigest()})
    with pytest.raises(FirmwareRejected, match="does not verify"):
        verify_offer(tampered, signing_key.public_key())


def test_without_a_configured_key_every_offer_is_refused(signing_key):
    with pytest.raises(FirmwareRejected, match="no firmware signing key"):
        verify_offer(offer_for(IMAGE, signing_key), None)


def test_a_downloaded_image_that_is_not_the_signed_one_is_refused(signing_key):
    offer = offer_for(IMAGE, signing_key)
    with pytest.raises(FirmwareRejected, match="digest does not match"):
        offer.check_image(IMAGE[:-1] + b"!")
    with pytest.raises(FirmwareRejected, match="bytes, the offer said"):
        offer.check_image(IMAGE + b"extra")


def test_the_public_key_loads_from_pem_hex_and_base64(signing_key):
    public = signing_key.public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    import base64

    for form in (pem, pem.decode(), raw, raw.hex(), base64.b64encode(raw).decode()):
        loaded = load_public_key(form)
        assert loaded.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) == raw
    with pytest.raises(ValueError):
        load_public_key(b"short")


@pytest.mark.parametrize(
    "offered, running, downgrade",
    [
        ("1.9.3", "1.10.0", True),
        ("1.10.0", "1.9.3", False),
        ("2.0", "2.0.0", True),
        ("v3", "2.9", False),
        ("beta", "1.0", False),
    ],
)
def test_downgrades_are_recognised_for_numeric_versions(offered, running, downgrade):
    assert is_downgrade(offered, running) is downgrade


def sign_csr(csr_pem: str, *, common_name: str | None = None, key=None):
    """A stand-in for the console's CA (the PKI is a later issue): sign what the CSR asks for."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    subject = csr.subject if common_name is None else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")]))
        .public_key(key.public_key() if key else csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(ca_key, hashes.SHA256())
    )
    return certificate, certificate.public_bytes(serialization.Encoding.PEM).decode()


@pytest.mark.parametrize("key_type", ["ec-p256", "ed25519"])
def test_the_device_makes_its_key_and_a_csr_for_its_client_id(key_type):
    pair = make_key_and_csr("device-0042", key_type)
    csr = x509.load_pem_x509_csr(pair.csr_pem.encode())
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "device-0042"
    protocol.encode("csr", id="c1", ts=1.0, ref="cmd-1", csr=pair.csr_pem)  # fits the protocol


def test_a_certificate_for_the_pending_key_and_id_is_accepted():
    pair = make_key_and_csr("device-0042")
    certificate, pem = sign_csr(pair.csr_pem)
    serial = check_certificate(pem, private_key_pem=pair.private_key_pem, client_id="device-0042")
    assert serial == format(certificate.serial_number, "x")


def test_a_certificate_for_another_key_is_refused():
    pair = make_key_and_csr("device-0042")
    _, pem = sign_csr(pair.csr_pem, key=ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(CertificateRejected, match="different key"):
        check_certificate(pem, private_key_pem=pair.private_key_pem, client_id="device-0042")


def test_a_certificate_for_another_client_id_is_refused():
    pair = make_key_and_csr("device-0042")
    _, pem = sign_csr(pair.csr_pem, common_name="device-0043")
    with pytest.raises(CertificateRejected, match="expected 'device-0042'"):
        check_certificate(pem, private_key_pem=pair.private_key_pem, client_id="device-0042")


def test_an_unknown_key_type_is_refused():
    with pytest.raises(CertificateRejected, match="unsupported key type"):
        make_key_and_csr("device-0042", "rsa-512")
