from django.urls import path  # noqa: F401

urlpatterns: list = [
    # --- audit log pages (UI work) ---
    # --- broker policy, credentials and broker state pages (broker-enforcement work) ---
]
