"""The OpenAPI schema: valid, documented offline, and true to what the API does (schemathesis)."""

import re
from html.parser import HTMLParser

import pytest
import schemathesis
from django.contrib.staticfiles import finders
from django.core.management import call_command
from django.core.wsgi import get_wsgi_application
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from rest_framework.authtoken.models import Token
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.conftest import make_user
from tests.factories import DeviceFactory, DeviceGroupFactory, DeviceModelFactory


@pytest.mark.django_db
def test_schema_generates_without_errors_or_warnings(tmp_path):
    target = tmp_path / "schema.yml"
    # --fail-on-warn turns every drf-spectacular warning into an error; --validate checks the OpenAPI spec.
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(target))
    text = target.read_text()
    for path in ("/api/v1/devices/", "/api/v1/devices/{client_id}/", "/api/v1/audit-log/", "/api/v1/auth/token/"):
        assert f"  {path}:" in text


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls = []

    def handle_starttag(self, tag, attrs):
        self.urls += [value for name, value in attrs if name in {"src", "href"} and value]


@pytest.mark.django_db
def test_docs_page_loads_with_local_assets_only(client, operator):
    client.force_login(operator)
    response = client.get("/api/v1/docs/")
    assert response.status_code == 200
    html = response.content.decode()
    parser = _Links()
    parser.feed(html)
    assert parser.urls, "the page should load Swagger UI's script and style"
    for url in parser.urls:
        assert url.startswith("/static/"), url
        assert finders.find(url.removeprefix("/static/")), f"{url} is not a static file of the project"
    assert not re.search(r"https?://", html), "the docs page names an external address"
    assert '"validatorUrl": null' in html  # no schema sent to validator.swagger.io
    assert 'url: "/api/v1/schema/"' in html


@pytest.mark.django_db
def test_schema_needs_a_signed_in_user(client):
    assert client.get("/api/v1/schema/").status_code == 401
    assert client.get("/api/v1/docs/")["Location"].startswith("/accounts/login/")


@pytest.fixture
def admin_token(db):
    user = make_user("admin", "schemathesis-admin")
    return Token.objects.create(user=user).key


@pytest.fixture
def wsgi_app(db):
    """The real WSGI application. Like Django's test client, keep the handler from closing the test's
    database connection at the end of each request (the test runs inside one transaction)."""
    from django.core.signals import request_finished, request_started
    from django.db import close_old_connections

    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield get_wsgi_application()
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


@pytest.fixture
def api_schema(admin_token, wsgi_app):
    # Some data so that detail and filter operations can hit real rows.
    model = DeviceModelFactory(name="TH-1")
    group = DeviceGroupFactory(name="north")
    DeviceFactory(client_id="device-1", model=model).groups.add(group)
    auth = {"Authorization": f"Token {admin_token}"}
    schema = schemathesis.openapi.from_wsgi("/api/v1/schema/?format=json", wsgi_app, headers=auth)
    # The token endpoint is throttled and changes nothing worth fuzzing; it has its own tests.
    return schema.exclude(path="/api/v1/auth/token/")


EXAMPLES_PER_OPERATION = 10
# Schemathesis cannot know that a device's model must exist, or that a name must be unique, so a
# schema-valid request may rightly be refused with a 400 naming the field.
EXCLUDED_CHECKS = [positive_data_acceptance]


def _run_operation(operation, mode, headers) -> list[str]:
    failures = []

    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        derandomize=True,  # the same examples every run: a failure here is reproducible
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case):
        try:
            case.call_and_validate(headers=headers, excluded_checks=EXCLUDED_CHECKS)
        except (schemathesis.errors.FailureGroup, AssertionError) as exc:  # one report per failing case
            failures.append(f"{operation.label} [{mode.value}]: {exc}\n{case.as_curl_command(headers=headers)}")

    try:
        run()
    except Unsatisfiable:
        # Negative mode needs something to break; an operation whose every input is a free-form
        # string (or that has none) has no invalid form to send.
        if mode is GenerationMode.POSITIVE:
            raise
    return failures


@pytest.mark.slow
def test_api_conforms_to_its_schema(api_schema, admin_token):
    """Schemathesis over every operation, valid and invalid input: no 5xx, every response matches the
    documented schema, and invalid input is refused with a 4xx."""
    headers = {"Authorization": f"Token {admin_token}"}
    failures = []
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 15
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            failures += _run_operation(operation, mode, headers)
    assert not failures, "\n\n".join(failures[:200])
