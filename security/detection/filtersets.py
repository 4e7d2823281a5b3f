"""One FilterSet for alerts: the alert list page and GET /api/v1/alerts/ alike."""

import django_filters

from security.models import Alert


class AlertFilterSet(django_filters.FilterSet):
    device = django_filters.CharFilter(field_name="client_id", lookup_expr="iexact", label="Device (client id)")
    kind = django_filters.CharFilter(field_name="kind", label="Kind")
    severity = django_filters.MultipleChoiceFilter(choices=Alert.Severity.choices, label="Severity")
    state = django_filters.MultipleChoiceFilter(choices=Alert.State.choices, label="State")

    class Meta:
        model = Alert
        fields = ["device", "kind", "severity", "state"]
