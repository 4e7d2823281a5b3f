"""PKI pages: the CA page with downloads for firmware teams, and on the device page: upload a CSR, make a factory
bundle (shown once), revoke a certificate. Thin: the work is in security.pki.services."""

from django.contrib import messages
from django.core.exceptions import ValidationError
from django.http import Http404, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views import View

from devices.models import Device
from security.models import DeviceCertificate
from security.permissions import RoleRequiredMixin
from security.pki import services as pki
from security.views.broker import _device_url

MAX_UPLOAD_BYTES = 16 * 1024


class PkiView(RoleRequiredMixin, View):
    permission_required = "devices.view_device"

    def get(self, request):
        return render(request, "security/pki.html", {"pki": pki.pki_overview(), "section": "pki"})


class PkiDownloadView(RoleRequiredMixin, View):
    """chain.pem (what devices trust), issuing.pem, root.pem, crl.pem."""

    permission_required = "devices.view_device"

    def get(self, request, name: str):
        issuing = pki.pki_ensure()
        root = pki.root_ca()
        content = {
            "chain": pki.ca_chain_pem(issuing),
            "issuing": issuing.certificate_pem,
            "root": root.certificate_pem if root else "",
            "crl": pki.crl_current(issuing),
        }.get(name)
        if not content:
            raise Http404("No such file.")
        response = HttpResponse(content, content_type="application/x-pem-file")
        response["Content-Disposition"] = f'attachment; filename="fleetkeeper-{name}.pem"'
        return response


class DeviceCertificatesFragmentView(RoleRequiredMixin, View):
    """The certificates card alone (for htmx refreshes; the device page includes the same template)."""

    permission_required = "devices.view_device"

    def get(self, request, client_id: str):
        device = get_object_or_404(Device, client_id=client_id)
        return render(request, "security/_device_certificates.html", {"device": device})


def _issued_page(request, *, device, issued, bundle: bool):
    response = render(
        request,
        "security/pki_issued.html",
        {"device": device, "issued": issued, "bundle": bundle, "device_url": _device_url(device.client_id)},
    )
    response["Cache-Control"] = "no-store"
    response["Pragma"] = "no-cache"
    return response


class DeviceCertificateIssueView(RoleRequiredMixin, View):
    """POST a CSR (file upload ``csr_file`` or pasted ``csr``)."""

    permission_required = "devices.issue_credentials"
    http_method_names = ["get", "post"]

    def get(self, request, client_id: str):
        return redirect(_device_url(client_id))

    def post(self, request, client_id: str):
        device = get_object_or_404(Device, client_id=client_id)
        upload = request.FILES.get("csr_file")
        if upload is not None:
            if upload.size > MAX_UPLOAD_BYTES:
                messages.error(request, f"The CSR file is larger than {MAX_UPLOAD_BYTES} bytes.")
                return redirect(_device_url(client_id))
            csr_pem = upload.read().decode("ascii", errors="replace")
        else:
            csr_pem = request.POST.get("csr", "")
        try:
            issued = pki.certificate_issue_from_csr(actor=request.user, device=device, csr_pem=csr_pem)
        except ValidationError as exc:
            for message in exc.messages:
                messages.error(request, message)
            return redirect(_device_url(client_id))
        return _issued_page(request, device=device, issued=issued, bundle=False)


class DeviceCertificateBundleView(RoleRequiredMixin, View):
    permission_required = "devices.issue_credentials"
    http_method_names = ["get", "post"]

    def get(self, request, client_id: str):
        return redirect(_device_url(client_id))

    def post(self, request, client_id: str):
        device = get_object_or_404(Device, client_id=client_id)
        try:
            issued = pki.certificate_factory_bundle(actor=request.user, device=device)
        except ValidationError as exc:
            for message in exc.messages:
                messages.error(request, message)
            return redirect(_device_url(client_id))
        return _issued_page(request, device=device, issued=issued, bundle=True)


class DeviceCertificateRevokeView(RoleRequiredMixin, View):
    permission_required = "devices.revoke_device"
    http_method_names = ["post"]

    def post(self, request, client_id: str, serial: str):
        record = get_object_or_404(DeviceCertificate, client_id=client_id, serial=serial.upper())
        try:
            pki.certificate_revoke(actor=request.user, certificate=record, reason=request.POST.get("reason", ""))
        except ValidationError as exc:
            for message in exc.messages:
                messages.error(request, message)
        else:
            messages.success(
                request, f"Certificate {record.serial[:16]}… revoked: the broker refuses it once it has reloaded."
            )
        return redirect(_device_url(client_id))
