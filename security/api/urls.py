from django.urls import path  # noqa: F401

urlpatterns: list = [
    # --- audit log API (API work) ---
    # --- policy, credentials API (broker-enforcement work) ---
]
