#!/usr/bin/env python3
"""Provisions the demo directory over SCIM, as an identity provider would: the user
alice@example.com in the group "eng", and the AI agent "demo-agent" owned by alice, running in
the AgenticApplication "Demo assistants". Safe to run again: existing entries are kept, and
made as they were (you may have deactivated or deleted some last time): alice active and a
member of "eng", the application active, the agent active, owned by alice, in the
application."""
import json
import sys
import urllib.error
import urllib.parse
import urllib.request

BASE = "http://127.0.0.1:8080/scim/v2"
HEADERS = {
    "Host": "auth.localhost:8080",
    "Authorization": "Bearer demo-scim-token-change-me-0123456789",
    "Content-Type": "application/scim+json",
}


def call(method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(BASE + path, data=data, method=method, headers=HEADERS)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def find(kind, attr, value):
    query = urllib.parse.urlencode({"filter": f'{attr} eq "{value}"'})
    status, body = call("GET", f"/{kind}?{query}")
    resources = (body or {}).get("Resources") or []
    return resources[0]["id"] if status == 200 and resources else None


PATCH_OP = "urn:ietf:params:scim:api:messages:2.0:PatchOp"


def patch(path, operations, what):
    status, body = call("PATCH", path, {"schemas": [PATCH_OP], "Operations": operations})
    if status not in (200, 204):
        sys.exit(f"could not {what}: {status} {body}")


alice = find("Users", "userName", "alice@example.com")
if alice is not None:
    patch(f"/Users/{alice}", [{"op": "replace", "value": {"active": True}}], "re-activate alice")
else:
    status, body = call("POST", "/Users", {
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
        "userName": "alice@example.com",
        "name": {"givenName": "Alice", "familyName": "Demo"},
        "emails": [{"value": "alice@example.com", "type": "work", "primary": True}],
        "active": True,
    })
    if status != 201:
        sys.exit(f"could not create alice: {status} {body}")
    alice = body["id"]
eng = find("Groups", "displayName", "eng")
if eng is not None:
    patch(f"/Groups/{eng}", [{"op": "add", "path": "members", "value": [{"value": alice}]}],
          "put alice back in eng")
else:
    status, body = call("POST", "/Groups", {
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
        "displayName": "eng",
        "members": [{"value": alice}],
    })
    if status != 201:
        sys.exit(f"could not create the group eng: {status} {body}")
application = find("AgenticApplications", "name", "Demo assistants")
if application is not None:
    patch(f"/AgenticApplications/{application}", [{"op": "replace", "value": {"active": True}}],
          "re-activate the application")
else:
    status, body = call("POST", "/AgenticApplications", {
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:AgenticApplication"],
        "name": "Demo assistants",
        "active": True,
    })
    if status != 201:
        sys.exit(f"could not create the application: {status} {body}")
    application = body["id"]
EXTENSION = "urn:portcullis:params:scim:schemas:extension:2.0:Agent"
LINKS = {"owners": [{"value": alice, "type": "User"}], "applications": [{"value": application}]}
agent = find("Agents", "name", "demo-agent")
if agent is not None:
    # alice or the application may be new (deleted last time, made again just now).
    patch(f"/Agents/{agent}", [{"op": "replace", "value": {"active": True, EXTENSION: LINKS}}],
          "make the agent active, owned by alice, in the application again")
else:
    # Its name is its OAuth client's id, which its client-credentials tokens carry.
    status, body = call("POST", "/Agents", {
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Agent", EXTENSION],
        "name": "demo-agent",
        "displayName": "Demo ticket assistant",
        "agentType": "Assistant",
        "active": True,
        EXTENSION: LINKS,
    })
    if status != 201:
        sys.exit(f"could not create the agent: {status} {body}")
print(f"directory ready: alice@example.com ({alice}) in group eng; "
      "the agent demo-agent, owned by alice")
