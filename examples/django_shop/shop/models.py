from django.db import models


class Order(models.Model):
    item = models.CharField(max_length=200)
    email = models.EmailField()
    receipt_sent = models.BooleanField(default=False)
