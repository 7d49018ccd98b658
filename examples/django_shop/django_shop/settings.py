"""Settings of the example shop: one SQLite file in the project folder, shared with the worker."""

from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = "example-only-not-a-secret"
DEBUG = True
ALLOWED_HOSTS = ["localhost", "127.0.0.1", "testserver"]

INSTALLED_APPS = ["shop"]
ROOT_URLCONF = "django_shop.urls"
USE_TZ = True
TIME_ZONE = "UTC"  # Django sets the process time zone from this (the worker's log times too)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": BASE_DIR / "db.sqlite3",  # `worker run --django-settings django_shop.settings` serves this file
        "OPTIONS": {
            # How long a write waits for the lock the worker may hold (see "the shared-file rule").
            "timeout": 5,
            # atomic() takes the write lock at BEGIN: a transaction that reads and then writes
            # never fails with "database is locked" at once when the worker has just written.
            "transaction_mode": "IMMEDIATE",
        },
    }
}
