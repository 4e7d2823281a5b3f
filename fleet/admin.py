from django.contrib import admin


class ReadOnlyAdmin(admin.ModelAdmin):
    """The Django admin only shows: every change goes through the console's services, which validate, audit
    and enforce on the broker. An admin form would bypass all three."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
