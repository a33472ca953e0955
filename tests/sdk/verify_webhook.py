"""Verifies a webhook Sluice sent with the Standard Webhooks reference library.

Reads the body from stdin; headers and secret from the environment.
Prints "verified" and exits 0, or fails with the library's error.
"""

import os
import sys

from standardwebhooks import Webhook

body = sys.stdin.buffer.read()
headers = {
    "webhook-id": os.environ["WEBHOOK_ID"],
    "webhook-timestamp": os.environ["WEBHOOK_TIMESTAMP"],
    "webhook-signature": os.environ["WEBHOOK_SIGNATURE"],
}
payload = Webhook(os.environ["WEBHOOK_SECRET"]).verify(body, headers)
print("verified", payload["type"])
