#!/usr/bin/env python3
"""The demo's AI agent at work: it gets a client-credentials token from the demo IdP and calls
http://api.localhost:8080 through Portcullis. Then its owner, alice, is deactivated over SCIM,
as the IdP would, and the agent's very next call is refused; alice is re-activated at the end.
Run it while scripts/demo.sh is up."""
import base64
import json
import re
import sys
import urllib.error
import urllib.parse
import urllib.request

IDP_TOKEN = "http://127.0.0.1:9400/token"
AGENT = ("demo-agent", "demo-agent-secret-change-me-0123456789")
PROXY = "http://127.0.0.1:8080"
SCIM = {
    "Host": "auth.localhost:8080",
    "Authorization": "Bearer demo-scim-token-change-me-0123456789",
    "Content-Type": "application/scim+json",
}


def send(req):
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def token():
    basic = base64.b64encode(":".join(AGENT).encode()).decode()
    form = urllib.parse.urlencode({"grant_type": "client_credentials"}).encode()
    req = urllib.request.Request(IDP_TOKEN, data=form, headers={"Authorization": f"Basic {basic}"})
    status, body = send(req)
    if status != 200:
        sys.exit(f"the IdP refused the agent's client credentials: {status} {body}")
    return json.loads(body)["access_token"]


def call(access_token):
    req = urllib.request.Request(PROXY + "/tickets", headers={
        "Host": "api.localhost:8080",
        "Authorization": f"Bearer {access_token}",
        "Accept": "application/json",
    })
    return send(req)


def set_alice_active(active):
    query = urllib.parse.urlencode({"filter": 'userName eq "alice@example.com"'})
    status, body = send(urllib.request.Request(f"{PROXY}/scim/v2/Users?{query}", headers=SCIM))
    alice = json.loads(body)["Resources"][0]["id"]
    patch = {"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
             "Operations": [{"op": "replace", "value": {"active": active}}]}
    req = urllib.request.Request(f"{PROXY}/scim/v2/Users/{alice}", method="PATCH",
                                 data=json.dumps(patch).encode(), headers=SCIM)
    status, body = send(req)
    if status != 200:
        sys.exit(f"SCIM refused the change: {status} {body}")


access_token = token()
status, body = call(access_token)
print(f"demo-agent calls GET http://api.localhost:8080/tickets: {status}")
if status != 200:
    sys.exit(body)
seen = re.search(r"<td>x-portcullis-agent</td><td>([^<]*)</td>", body, re.IGNORECASE)
print(f"  the upstream was told X-Portcullis-Agent: {seen.group(1) if seen else '(nothing)'}")
set_alice_active(False)
print("alice, the agent's only owner, is deactivated over SCIM")
status, body = call(access_token)
print(f"demo-agent calls again, with the same token: {status}")
print(f"  {json.loads(body).get('reason') if status == 403 else body.strip()[:200]}")
set_alice_active(True)
print("alice is active again (she signs in afresh: her old sessions ended with the deactivation)")
sys.exit(0 if status == 403 else 1)
