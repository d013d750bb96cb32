// A real OpenID provider for Portcullis' end-to-end tests: the OpenID-certified `oidc-provider`
// package on 127.0.0.1, set up entirely by the test, plus a few test-control endpoints.
//
// Usage: node idp.mjs SETUP.json      (or the setup JSON on stdin)
//
// The setup (every key optional but `clients` and `users`):
//   port              listen port on 127.0.0.1; 0 (the default) lets the kernel pick one
//   issuer            the issuer URL; `{port}` in it is replaced by the port listened on
//                     (default "http://127.0.0.1:{port}")
//   clients           oidc-provider client metadata, snake_case, as in dynamic registration
//                     (`{port}` in any string value is replaced too)
//   users             [{ sub, email, password, name, groups, email_verified, preferred_username,
//                     oid, claims }]: `claims` are claims as the IdP words them, over the others
//   resources         [{ indicator, audience, scope, access_token_ttl, alg }]: resource servers whose
//                     access tokens are JWTs with `aud` = audience (resource indicators, RFC 8707)
//   default_resource  the indicator a client-credentials request without `resource` gets
//   ttl               oidc-provider `ttl` overrides in seconds ({ AccessToken: 60, ... })
//   logout_auto_submit  whether the RP-initiated logout page submits itself (default true)
//   profile           how tokens look: "conformant" (the default: oidc-provider as it ships),
//                     "entra" (Microsoft Entra ID: a pairwise `sub`, `oid`, `tid`,
//                     `preferred_username` (the UPN) and `name` in the ID token, no `email`;
//                     access tokens dated 5 minutes early, `iat` and `nbf`, as Entra dates its
//                     tokens, with `tid`, their client as `azp`, not `client_id`, whose they
//                     are as `oid`, a person's scopes as `scp`, and an app-only token's `sub`
//                     its service principal's object id, its `oid`), or
//                     "okta" (the claims of the scopes asked for in the ID token, as Okta's /token
//                     answer to the code flow has them; `groups` only when the `groups` scope is
//                     asked; access tokens name their client `cid`, not `client_id`, and a
//                     person by their login as `sub` and user id as `uid`; give users
//                     Okta-style subs, `00u…`)
//   userinfo_only_claims  names of claims never put in an ID token, only in UserInfo answers
//   group_membership_claims  in the entra profile, the app registration's groupMembershipClaims
//                     set: the user's groups as `groups` in the ID token, by object id
//                     (`entraGroupId`), left out for a user in none, as Entra ID leaves it out,
//                     and past 200 only `_claim_names`/`_claim_sources` (Entra's overage)
//   conform_id_token_claims  oidc-provider's conformIdTokenClaims (default true, as it ships):
//                     claims asked for by scope are only at UserInfo when an access token is
//                     issued; false puts them in the ID token too
//
// Token exchange (RFC 8693), as an IdP that lets an agent act for a person offers it: a client
// allowed the grant `urn:ietf:params:oauth:grant-type:token-exchange` presents a person's ID
// token from this IdP (`subject_token`, `subject_token_type` …:id_token) and a `resource`, and
// gets a JWT access token for that resource whose `sub` is the person and whose `act` is
// `{sub, client_id}` of the client, the actor (RFC 8693 §4.1). It is registered with
// oidc-provider's own `registerGrantType`.
//
// The login form (at the interaction URL) is plain HTML with inputs `login` and `password`;
// consent is granted automatically, so no consent page ever appears.
//
// A refresh token is issued only to a sign-in that asked for `offline_access`, as Okta and Entra ID
// issue them (without asking for `prompt=consent`, which oidc-provider alone would want).
//
// Test-control endpoints (not OIDC), all answering JSON:
//   GET  /test/health
//   POST /test/rotate-keys         {keep_old, same_kids}: fresh RS256 + ES256 keys sign from now
//                                  on; the previous ones stay in the JWKS only when keep_old is
//                                  true; with same_kids the fresh keys take the kids of the ones
//                                  they replace (an IdP that replaced a key under its kid)
//   POST /test/backchannel-logout  {sub, client_id, end_session?}: sends a real logout token to
//                                  the client's backchannel_logout_uri for each session of `sub`
//                                  with that client, then ends those sessions (unless
//                                  end_session is false); {resend_last: true}: sends the last
//                                  delivery again, the same token, as an IdP retrying one does
//   POST /test/set-groups          {sub, groups}: the user's groups from now on, in the tokens
//                                  and UserInfo answers issued after (an admin's change)
//   POST /test/stop-serving        {mode: "503" | "reset" | "hang" | "gateway" | "server-error" |
//                                  "userinfo" | "userinfo-refuses" | "userinfo-other-sub" |
//                                  "userinfo-redirect" | "userinfo-page" | "userinfo-404" |
//                                  "userinfo-gateway-404" | "userinfo-spring-404" | "spring-404" |
//                                  "jwks" | "jwks-empty"}: every non-/test/
//                                  request gets a 503, has its connection reset, is never
//                                  answered, or gets a gateway's 502 in JSON, or a 500 that reads
//                                  as an OAuth error; or only UserInfo (`/me`) answers 503, or
//                                  401 to every access token (one meant for another API), or
//                                  about another person (a `sub` not the token's), or
//                                  redirects to a maintenance page, or serves one with 200
//                                  (as a proxy in front in maintenance mode does), or a
//                                  gateway's 404, a page or Kong's JSON or Spring's (as during
//                                  a deployment); or every OIDC request gets Spring's 404 JSON
//                                  (`"error": "Not Found"`); or only
//                                  the key set (`/jwks`) answers 503, or an empty set (as an
//                                  IdP node whose keys failed to load serves)
//   POST /test/start-serving       back to normal (unanswered requests have their connections
//                                  closed)
//
// Prints one line `ready {"port":…,"issuer":…}` on stdout once listening, and before it a
// `phase NAME +MS` line as each step of start-up completes (milliseconds since the process
// started), so a start that stalls shows where.

import { createHash, createPrivateKey, generateKeyPairSync, randomBytes, timingSafeEqual } from 'node:crypto';
import { readFileSync } from 'node:fs';
import http from 'node:http';

import Provider, { errors } from 'oidc-provider';

// ----- setup -------------------------------------------------------------------------------

function phase(name) {
  process.stdout.write(`phase ${name} +${Math.round(performance.now())}\n`);
}

phase('imported');

function readSetup() {
  const path = process.argv[2];
  const text = path && path !== '-' ? readFileSync(path, 'utf8') : readFileSync(0, 'utf8');
  return JSON.parse(text);
}

const setup = readSetup();
phase('setup-read');

function substitutePort(value, port) {
  if (typeof value === 'string') return value.replaceAll('{port}', String(port));
  if (Array.isArray(value)) return value.map((v) => substitutePort(v, port));
  if (value && typeof value === 'object') {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, substitutePort(v, port)]));
  }
  return value;
}

const users = new Map(
  (setup.users || []).map((u) => {
    const sub = u.sub ?? u.accountId ?? u.account_id;
    if (!sub) throw new Error(`user without sub: ${JSON.stringify(u)}`);
    return [sub, { ...u, sub }];
  }),
);

const resources = new Map((setup.resources || []).map((r) => [r.indicator, r]));

// ----- keys --------------------------------------------------------------------------------

let keyGeneration = 0;

// A private key as a JWK. The key is generated as PEM and imported again before it is exported
// as a JWK, never exported from the generated KeyObject itself: in Node.js 20, exporting a
// generated key as a JWK holds the key's mutex while it allocates, an allocation may start a
// garbage collection, and the collection may destroy the finished key-generation job, whose
// destructor takes the same mutex. The process then waits on itself forever (a futex wait on
// the main thread, seen under load as a test IdP that never printed `ready`). The imported
// key has a mutex of its own, which no job shares.
function newPrivateJwk(type, options) {
  const { privateKey } = generateKeyPairSync(type, {
    ...options,
    privateKeyEncoding: { type: 'pkcs8', format: 'pem' },
    publicKeyEncoding: { type: 'spki', format: 'pem' },
  });
  return createPrivateKey(privateKey).export({ format: 'jwk' });
}

function newSigningKeys() {
  keyGeneration += 1;
  const tag = `${keyGeneration}-${randomBytes(4).toString('hex')}`;
  const rsa = newPrivateJwk('rsa', { modulusLength: 2048 });
  const ec = newPrivateJwk('ec', { namedCurve: 'P-256' });
  return [
    { ...rsa, kid: `rs256-${tag}`, alg: 'RS256', use: 'sig' },
    { ...ec, kid: `es256-${tag}`, alg: 'ES256', use: 'sig' },
  ];
}

// The first keys of an algorithm sign; later ones are published for verification only.
let signingKeys = newSigningKeys();
phase('keys-generated');
// Cookie-signing keys outlive key rotation, so sessions survive a provider rebuild.
const cookieKeys = [randomBytes(32).toString('hex')];

// ----- storage -----------------------------------------------------------------------------

// One store for every model, kept across provider rebuilds (key rotation), and enumerable so
// the back-channel logout endpoint can find a user's sessions.
const store = new Map(); // "Model:id" -> { payload, expiresAt }
const sessionUids = new Map(); // uid -> session id
const userCodes = new Map(); // userCode -> id
const grantMembers = new Map(); // grantId -> Set<"Model:id">

function live(key) {
  const entry = store.get(key);
  if (!entry) return undefined;
  if (entry.expiresAt !== undefined && entry.expiresAt <= Date.now()) {
    store.delete(key);
    return undefined;
  }
  return entry.payload;
}

class Adapter {
  constructor(model) {
    this.model = model;
  }

  key(id) {
    return `${this.model}:${id}`;
  }

  async upsert(id, payload, expiresIn) {
    const key = this.key(id);
    const expiresAt = typeof expiresIn === 'number' ? Date.now() + expiresIn * 1000 : undefined;
    store.set(key, { payload, expiresAt });
    if (this.model === 'Session' && payload.uid) sessionUids.set(payload.uid, id);
    if (payload.userCode) userCodes.set(payload.userCode, id);
    if (payload.grantId) {
      if (!grantMembers.has(payload.grantId)) grantMembers.set(payload.grantId, new Set());
      grantMembers.get(payload.grantId).add(key);
    }
  }

  async find(id) {
    return live(this.key(id));
  }

  async findByUid(uid) {
    const id = sessionUids.get(uid);
    return id === undefined ? undefined : this.find(id);
  }

  async findByUserCode(userCode) {
    const id = userCodes.get(userCode);
    return id === undefined ? undefined : this.find(id);
  }

  async consume(id) {
    const payload = live(this.key(id));
    if (payload) payload.consumed = Math.floor(Date.now() / 1000);
  }

  async destroy(id) {
    store.delete(this.key(id));
  }

  async revokeByGrantId(grantId) {
    for (const key of grantMembers.get(grantId) || []) store.delete(key);
    grantMembers.delete(grantId);
  }
}

function sessionsOf(sub) {
  const found = [];
  for (const key of store.keys()) {
    if (!key.startsWith('Session:')) continue;
    const payload = live(key);
    if (payload && payload.accountId === sub) found.push({ id: key.slice('Session:'.length), payload });
  }
  return found;
}

// ----- pages -------------------------------------------------------------------------------

function esc(value) {
  return String(value ?? '')
    .replaceAll('&', '&amp;')
    .replaceAll('<', '&lt;')
    .replaceAll('>', '&gt;')
    .replaceAll('"', '&quot;')
    .replaceAll("'", '&#39;');
}

function page(title, body) {
  return `<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>${esc(title)}</title></head>
<body>
<h1>${esc(title)}</h1>
${body}
</body>
</html>
`;
}

function loginPage(uid, clientId, login, error) {
  return page(
    'Sign in to the test IdP',
    `<p>Client: <code>${esc(clientId)}</code></p>
${error ? `<p id="error" role="alert">${esc(error)}</p>` : ''}
<form id="login-form" method="post" action="/interaction/${esc(uid)}/login">
  <label>Email or user id <input type="text" id="login" name="login" value="${esc(login)}" autofocus></label>
  <label>Password <input type="password" id="password" name="password"></label>
  <button type="submit" id="submit">Sign in</button>
</form>`,
  );
}

// ----- the provider ------------------------------------------------------------------------

const profile = setup.profile ?? 'conformant';
/// How early Entra ID dates its tokens (`iat`, `nbf`), in seconds.
const ENTRA_EARLY = 300;
/// The tenant id the entra profile puts in `tid`.
const ENTRA_TENANT = '72f988bf-86f1-41af-91ab-2d7cd011db47';

// A GUID made of `text`, the same for the same text.
function guidOf(text) {
  const hex = createHash('sha256').update(text).digest('hex');
  return [hex.slice(0, 8), hex.slice(8, 12), hex.slice(12, 16), hex.slice(16, 20), hex.slice(20, 32)].join('-');
}

// The object id of `clientId`'s service principal in the entra profile's tenant: a GUID, the
// same for every token of the client.
function servicePrincipal(clientId) {
  return guidOf(`service-principal|${clientId}`);
}

// The object id of the group `name` in the entra profile's tenant: Entra's `groups` claim
// lists groups by object id, never by name (tests/src/idp.rs `entra_group_id`).
function entraGroupId(name) {
  return guidOf(`group|${name}`);
}

function claimsOf(user) {
  const worded = user.claims ?? {};
  if (profile === 'entra') {
    // Past 200 groups, a JWT lists none, only where Graph gives them (Entra's overage).
    const overage = {
      _claim_names: { groups: 'src1' },
      _claim_sources: {
        src1: { endpoint: `https://graph.microsoft.com/v1.0/users/${user.oid}/getMemberObjects` },
      },
    };
    const listed = user.groups?.length ?? 0;
    const groups = !setup.group_membership_claims || listed === 0
      ? {}
      : listed > 200 ? overage : { groups: user.groups.map(entraGroupId) };
    return {
      sub: user.sub,
      oid: user.oid,
      tid: ENTRA_TENANT,
      preferred_username: user.preferred_username ?? user.email,
      name: user.name,
      ...groups,
      ...worded,
    };
  }
  return {
    sub: user.sub,
    email: user.email,
    email_verified: user.email_verified ?? true,
    name: user.name,
    preferred_username: user.preferred_username ?? user.email,
    groups: user.groups ?? [],
    ...worded,
  };
}

function resourceServerInfo(indicator) {
  const r = resources.get(indicator);
  if (!r) throw new errors.InvalidTarget(`unknown resource indicator ${indicator}`);
  return {
    scope: r.scope ?? '',
    audience: r.audience ?? indicator,
    accessTokenTTL: r.access_token_ttl ?? 3600,
    accessTokenFormat: 'jwt',
    jwt: { sign: { alg: r.alg ?? 'RS256' } },
  };
}

const TOKEN_EXCHANGE = 'urn:ietf:params:oauth:grant-type:token-exchange';
const TOKEN_EXCHANGE_PARAMS = new Set(['subject_token', 'subject_token_type', 'resource', 'requested_token_type']);
const ID_TOKEN_TYPE = 'urn:ietf:params:oauth:token-type:id_token';
const ACCESS_TOKEN_TYPE = 'urn:ietf:params:oauth:token-type:access_token';

// The token-exchange grant (see the header): the client acts for the person in the ID token.
async function tokenExchange(ctx) {
  const { client, params, provider } = ctx.oidc;
  if (params.subject_token_type !== ID_TOKEN_TYPE) {
    throw new errors.InvalidRequest(`subject_token_type must be ${ID_TOKEN_TYPE}`);
  }
  let claims;
  try {
    claims = JSON.parse(Buffer.from(String(params.subject_token).split('.')[1], 'base64url'));
  } catch {
    throw new errors.InvalidGrant('subject_token is not a JWT');
  }
  const audience = Array.isArray(claims.aud) ? claims.aud[0] : claims.aud;
  const issuedTo = await provider.Client.find(String(audience));
  if (!issuedTo) throw new errors.InvalidGrant('subject_token was issued to no known client');
  // Its signature, issuer and audience; the expiry is checked below (validate ignores it).
  const { payload } = await provider.IdToken.validate(params.subject_token, issuedTo);
  if (!(payload.exp > Date.now() / 1000)) throw new errors.InvalidGrant('subject_token has expired');
  if (!users.has(payload.sub)) throw new errors.InvalidGrant('subject_token names nobody');
  const indicator = params.resource ?? setup.default_resource;
  if (!indicator) throw new errors.InvalidTarget('resource is required');
  const server = resourceServerInfo(indicator);
  const token = new provider.AccessToken({
    accountId: payload.sub,
    client,
    gty: 'token-exchange',
    scope: server.scope,
    resourceServer: new provider.ResourceServer(indicator, server),
  });
  ctx.body = {
    access_token: await token.save(),
    issued_token_type: ACCESS_TOKEN_TYPE,
    token_type: 'Bearer',
    expires_in: token.expiration,
  };
}

function buildProvider(issuer, clients) {
  const configuration = {
    clients,
    jwks: { keys: signingKeys },
    adapter: Adapter,
    cookies: {
      keys: cookieKeys,
      long: { httpOnly: true, sameSite: 'lax', secure: false },
      short: { httpOnly: true, sameSite: 'lax', secure: false },
    },
    claims: {
      conformant: {
        openid: ['sub'],
        email: ['email', 'email_verified'],
        // `groups` is no standard claim: IdPs that have one give it for a scope of its own
        // (Okta's `groups`), never for `profile`.
        profile: ['name', 'preferred_username', 'updated_at'],
        groups: ['groups'],
      },
      entra: { openid: ['sub', 'oid', 'tid', 'groups'], profile: ['name', 'preferred_username'] },
      okta: {
        openid: ['sub'],
        email: ['email', 'email_verified'],
        profile: ['name', 'preferred_username', 'updated_at'],
        groups: ['groups'],
      },
    }[profile],
    scopes: ['openid', 'offline_access', 'email', 'profile', 'groups'],
    // Okta's access tokens name their client `cid` (no `client_id`, no `azp`), and a person
    // by their login as `sub`, with their user id as `uid`.
    formats: {
      customizers: {
        async jwt(_ctx, token, jwt) {
          if (profile === 'entra') {
            jwt.payload.iat -= ENTRA_EARLY;
            jwt.payload.nbf = jwt.payload.iat;
            // Entra's v2.0 access tokens name their tenant, and their client as `azp`.
            jwt.payload.tid = ENTRA_TENANT;
            jwt.payload.azp = jwt.payload.client_id;
            delete jwt.payload.client_id;
            // And whose they are by object id: a person's, with the scopes they delegated as
            // `scp`; an application's own (app-only) token, its service principal's, which is
            // its `sub` too, and no `scp`. No `scope` claim: Entra has none.
            if (token.kind !== 'ClientCredentials') {
              const person = token.accountId && users.get(token.accountId);
              if (person?.oid) jwt.payload.oid = person.oid;
              jwt.payload.scp = jwt.payload.scope || 'user_impersonation';
            } else {
              jwt.payload.oid = servicePrincipal(jwt.payload.azp);
              jwt.payload.sub = jwt.payload.oid;
            }
            delete jwt.payload.scope;
          }
          if (profile !== 'okta') return;
          jwt.payload.cid = jwt.payload.client_id;
          delete jwt.payload.client_id;
          const user = token.accountId && users.get(token.accountId);
          if (user) {
            jwt.payload.uid = user.sub;
            jwt.payload.sub = user.preferred_username ?? user.email;
          }
        },
      },
    },
    // Entra ID puts its claims in the ID token whatever else it issues, and so does Okta in the
    // ID token its token endpoint returns for the code flow (its "thin" ID token is the
    // implicit flow's); the conformant profile is the package as it ships.
    conformIdTokenClaims: profile === 'conformant' ? setup.conform_id_token_claims ?? true : false,
    // Entra ID's `sub` is pairwise: one value per person and application.
    subjectTypes: profile === 'entra' ? ['public', 'pairwise'] : ['public'],
    async pairwiseIdentifier(_ctx, accountId, client) {
      return createHash('sha256').update(`${client.sectorIdentifier}|${accountId}`).digest('base64url');
    },
    async findAccount(_ctx, sub) {
      const user = users.get(sub);
      if (!user) return undefined;
      return {
        accountId: sub,
        async claims(use) {
          const claims = claimsOf(user);
          // Claims some providers give only at UserInfo, never in an ID token (a Keycloak
          // mapper set to "userinfo" alone).
          if (use === 'id_token') for (const name of setup.userinfo_only_claims ?? []) delete claims[name];
          // Entra ID's UserInfo (Microsoft Graph's) says no groups, listed or not.
          if (profile === 'entra' && use === 'userinfo') {
            for (const name of ['groups', '_claim_names', '_claim_sources']) delete claims[name];
          }
          return claims;
        },
      };
    },
    // Grant everything that is asked for: the tests never see a consent page.
    async loadExistingGrant(ctx) {
      const { oidc } = ctx;
      const grantId = oidc.result?.consent?.grantId || oidc.session.grantIdFor(oidc.client.clientId);
      let grant = grantId ? await oidc.provider.Grant.find(grantId) : undefined;
      if (!grant) {
        grant = new oidc.provider.Grant({ accountId: oidc.session.accountId, clientId: oidc.client.clientId });
      }
      const scopes = [...oidc.requestParamOIDCScopes];
      if (scopes.length) grant.addOIDCScope(scopes.join(' '));
      const claims = [...oidc.requestParamClaims];
      if (claims.length) grant.addOIDCClaims(claims);
      for (const [indicator, server] of Object.entries(oidc.resourceServers || {})) {
        if (server.scope) grant.addResourceScope(indicator, server.scope);
      }
      await grant.save();
      return grant;
    },
    interactions: {
      url: (_ctx, interaction) => `/interaction/${interaction.uid}`,
    },
    features: {
      devInteractions: { enabled: false },
      backchannelLogout: { enabled: true },
      clientCredentials: { enabled: true },
      revocation: { enabled: true },
      introspection: { enabled: true },
      userinfo: { enabled: true },
      // Signed UserInfo answers, for a client registered with userinfo_signed_response_alg.
      jwtUserinfo: { enabled: true },
      rpInitiatedLogout: {
        enabled: true,
        async logoutSource(ctx, form) {
          const auto = setup.logout_auto_submit ?? true;
          const withLogout = form.replace('</form>', '<input type="hidden" name="logout" value="yes"/></form>');
          ctx.body = page(
            'Sign out of the test IdP',
            `${withLogout}
<button type="submit" id="logout" form="op.logoutForm">Yes, sign me out</button>
${auto ? '<script>document.getElementById("op.logoutForm").submit();</script>' : ''}`,
          );
        },
        async postLogoutSuccessSource(ctx) {
          ctx.body = page('Signed out of the test IdP', '<p id="signed-out">You are signed out.</p>');
        },
      },
      resourceIndicators: {
        enabled: true,
        async defaultResource(ctx, _client, oneOf) {
          if (oneOf) return oneOf;
          if (ctx.oidc.params?.grant_type === 'client_credentials') return setup.default_resource;
          return undefined;
        },
        async getResourceServerInfo(_ctx, indicator) {
          return resourceServerInfo(indicator);
        },
        async useGrantedResource() {
          return true;
        },
      },
    },
    // A token-exchange token's actor is the client it was issued to (see tokenExchange).
    async extraTokenClaims(_ctx, token) {
      if (token.gty !== 'token-exchange') return undefined;
      return { act: { sub: token.clientId, client_id: token.clientId } };
    },
    // A refresh token only to a sign-in that asked for `offline_access`, as Okta and Entra ID
    // issue them. They ask no `prompt=consent` for it (the app's consent is given beforehand),
    // where oidc-provider drops the scope without one (OpenID Connect Core §11): so the scope
    // as the authorization request asked it is remembered by its nonce (see offlineAsked).
    // Every refresh returns a new refresh token, and the one it replaced is spent: used
    // again, it revokes the whole grant (oidc-provider's reuse detection). Real IdPs are
    // gentler, never harsher: Okta with rotation on takes a spent token for a grace period
    // (30 s by default) before it revokes; Entra ID returns a new one and keeps the old valid.
    // A proxy that kept using the first would lose the session at its second refresh here.
    rotateRefreshToken: true,
    async issueRefreshToken(_ctx, client, code) {
      return (
        client.grantTypeAllowed('refresh_token') &&
        (code.scopes.has('offline_access') || (code.nonce !== undefined && offlineAsked.has(code.nonce)))
      );
    },
    async renderError(ctx, out) {
      ctx.type = 'html';
      ctx.body = page(
        'Test IdP error',
        Object.entries(out)
          .map(([k, v]) => `<p class="${esc(k)}"><strong>${esc(k)}</strong>: ${esc(v)}</p>`)
          .join('\n'),
      );
    },
    ttl: {
      // Access tokens for a resource server live as long as its access_token_ttl says.
      AccessToken: (_ctx, token) => token.resourceServer?.accessTokenTTL ?? 3600,
      AuthorizationCode: 60,
      ClientCredentials: (_ctx, token) => token.resourceServer?.accessTokenTTL ?? 3600,
      IdToken: 3600,
      Interaction: 600,
      RefreshToken: 24 * 3600,
      Session: 24 * 3600,
      Grant: 24 * 3600,
      ...(setup.ttl || {}),
    },
    // The default fetch refuses loopback addresses (SSRF protection); every client of a test
    // lives on loopback.
    fetch(url, options) {
      const { dispatcher: _ignored, ...rest } = options;
      if (rest.body instanceof URLSearchParams && rest.body.has('logout_token')) {
        lastLogoutDelivery = { url, options: rest };
      }
      return globalThis.fetch(url, rest);
    },
  };
  const provider = new Provider(issuer, configuration);
  provider.proxy = false;
  provider.registerGrantType(TOKEN_EXCHANGE, tokenExchange, TOKEN_EXCHANGE_PARAMS);
  provider.on('server_error', (_ctx, err) => console.error('server_error', err));
  provider.on('backchannel.error', (_ctx, err) => console.error('backchannel.error', err.message));
  return provider;
}

// ----- HTTP --------------------------------------------------------------------------------

async function readBody(req, limit = 64 * 1024) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > limit) throw new Error('body too large');
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString('utf8');
}

function send(res, status, type, body, headers = {}) {
  res.writeHead(status, { 'content-type': type, 'cache-control': 'no-store', ...headers });
  res.end(body);
}

function sendJson(res, status, value) {
  send(res, status, 'application/json', JSON.stringify(value));
}

function passwordMatches(given, expected) {
  const a = Buffer.from(String(given ?? ''));
  const b = Buffer.from(String(expected ?? ''));
  return a.length === b.length && timingSafeEqual(a, b);
}

function findUser(login) {
  if (users.has(login)) return users.get(login);
  const lower = String(login ?? '').toLowerCase();
  return [...users.values()].find((u) => u.email && u.email.toLowerCase() === lower);
}

async function handleInteraction(provider, req, res, url) {
  const match = url.pathname.match(/^\/interaction\/([^/]+)(\/login)?$/);
  if (!match) return send(res, 404, 'text/plain', 'not found\n');
  let details;
  try {
    details = await provider.interactionDetails(req, res);
  } catch (err) {
    return send(res, 400, 'text/html', page('Test IdP error', `<p>${esc(err.message)}</p>`));
  }
  const { uid, prompt, params } = details;
  if (uid !== match[1]) return send(res, 400, 'text/plain', 'interaction mismatch\n');

  if (prompt.name !== 'login') {
    // Consent (or anything else): granted without asking, see loadExistingGrant.
    const grant = new provider.Grant({ accountId: details.session?.accountId, clientId: params.client_id });
    if (params.scope) grant.addOIDCScope(params.scope);
    const grantId = await grant.save();
    return provider.interactionFinished(req, res, { consent: { grantId } }, { mergeWithLastSubmission: true });
  }

  if (req.method === 'GET' && !match[2]) {
    return send(res, 200, 'text/html; charset=utf-8', loginPage(uid, params.client_id, params.login_hint, ''));
  }
  if (req.method !== 'POST' || !match[2]) return send(res, 405, 'text/plain', 'method not allowed\n');

  const form = new URLSearchParams(await readBody(req));
  const login = form.get('login');
  const user = findUser(login);
  if (!user || !passwordMatches(form.get('password'), user.password)) {
    const html = loginPage(uid, params.client_id, login, 'Wrong email or password.');
    return send(res, 401, 'text/html; charset=utf-8', html);
  }
  return provider.interactionFinished(
    req,
    res,
    { login: { accountId: user.sub, amr: ['pwd'] } },
    { mergeWithLastSubmission: false },
  );
}

// The last back-channel logout delivered (its URL and request, the token in it), sent again as
// it was by `resend_last`: as an IdP that retries a delivery the client did not answer 200 to.
let lastLogoutDelivery = null;

async function resendLastLogout() {
  if (!lastLogoutDelivery) return [404, { error: 'no back-channel logout was sent yet' }];
  // With a timeout of its own (that of the first delivery may have passed), as long as
  // oidc-provider gives each of its deliveries.
  const { url, options: { signal: _spent, ...options } } = lastLogoutDelivery;
  let response;
  try {
    response = await globalThis.fetch(url, { ...options, signal: AbortSignal.timeout(2500) });
  } catch (err) {
    return [502, { error: `${url} did not answer: ${err.message}` }];
  }
  if (response.status !== 200 && response.status !== 204) {
    return [502, { error: `expected 200 OK from ${url}, got: ${response.status}` }];
  }
  return [200, { resent: 1 }];
}

async function backchannelLogout(provider, body) {
  if (body.resend_last) return resendLastLogout();
  const { sub, client_id: clientId } = body;
  const endSession = body.end_session ?? true;
  const client = await provider.Client.find(clientId);
  if (!client) return [404, { error: `unknown client ${clientId}` }];
  if (!client.backchannelLogoutUri) return [400, { error: `client ${clientId} has no backchannel_logout_uri` }];
  const sids = [];
  const errorsSeen = [];
  for (const { id, payload } of sessionsOf(sub)) {
    const authorization = payload.authorizations?.[clientId];
    if (!authorization) continue;
    try {
      await client.backchannelLogout(sub, authorization.sid);
      sids.push(authorization.sid);
    } catch (err) {
      errorsSeen.push(err.message);
    }
    if (endSession) {
      if (authorization.grantId) await new Adapter('Grant').destroy(authorization.grantId);
      await new Adapter('Session').destroy(id);
    }
  }
  if (errorsSeen.length) return [502, { error: errorsSeen.join('; '), sids }];
  return [200, { sent: sids.length, sids }];
}

let provider;
let outage = null; // null, "503", "reset" or "hang"
// The nonces of authorization requests that asked for `offline_access` (see issueRefreshToken).
const offlineAsked = new Set();

function rememberOfflineAccess(url) {
  const scope = (url.searchParams.get('scope') || '').split(' ');
  const nonce = url.searchParams.get('nonce');
  if (scope.includes('offline_access') && nonce) {
    if (offlineAsked.size >= 10000) offlineAsked.clear();
    offlineAsked.add(nonce);
  }
}
const hung = new Set(); // sockets of requests held unanswered
let clientsConfig;
let issuer;

async function handleTest(req, res, url) {
  let body = {};
  if (req.method === 'POST') {
    const text = await readBody(req);
    body = text.trim() ? JSON.parse(text) : {};
  }
  switch (`${req.method} ${url.pathname}`) {
    case 'GET /test/health':
      return sendJson(res, 200, { ok: true, issuer, outage, kids: signingKeys.map((k) => k.kid) });
    case 'POST /test/rotate-keys': {
      const old = signingKeys;
      let fresh = newSigningKeys();
      if (body.same_kids) fresh = fresh.map((key, i) => ({ ...key, kid: old[i].kid }));
      signingKeys = [...fresh, ...(body.keep_old && !body.same_kids ? old : [])];
      provider = buildProvider(issuer, clientsConfig);
      return sendJson(res, 200, { kids: signingKeys.map((k) => k.kid) });
    }
    case 'POST /test/backchannel-logout': {
      const [status, value] = await backchannelLogout(provider, body);
      return sendJson(res, status, value);
    }
    case 'POST /test/set-groups': {
      const user = users.get(body.sub);
      if (!user) return sendJson(res, 404, { error: 'unknown user' });
      user.groups = body.groups ?? [];
      return sendJson(res, 200, { groups: user.groups });
    }
    case 'POST /test/stop-serving':
      outage = ['reset', 'hang', 'gateway', 'server-error', 'userinfo', 'userinfo-refuses', 'userinfo-other-sub', 'userinfo-redirect', 'userinfo-page', 'userinfo-404', 'userinfo-gateway-404', 'userinfo-spring-404', 'spring-404', 'jwks', 'jwks-empty'].includes(body.mode) ? body.mode : '503';
      return sendJson(res, 200, { outage });
    case 'POST /test/start-serving':
      outage = null;
      for (const socket of hung) socket.destroy();
      hung.clear();
      return sendJson(res, 200, { outage });
    default:
      return sendJson(res, 404, { error: 'unknown test endpoint' });
  }
}

const server = http.createServer(async (req, res) => {
  try {
    const url = new URL(req.url, 'http://127.0.0.1');
    if (url.pathname.startsWith('/test/')) return await handleTest(req, res, url);
    if (outage === 'reset') return req.socket.destroy();
    if (outage === 'hang') {
      hung.add(req.socket);
      req.socket.once('close', () => hung.delete(req.socket));
      return;
    }
    if (outage === '503') return send(res, 503, 'text/plain', 'test IdP outage\n', { 'retry-after': '1' });
    if (outage === 'userinfo' && url.pathname === '/me') return send(res, 503, 'text/plain', 'UserInfo outage\n');
    if (outage === 'userinfo-redirect' && url.pathname === '/me') {
      return send(res, 302, 'text/plain', 'Found\n', { location: '/maintenance' });
    }
    if (outage === 'userinfo-404' && url.pathname === '/me') {
      return send(res, 404, 'text/html', '<!doctype html><title>404 Not Found</title>\n');
    }
    if (outage === 'userinfo-gateway-404' && url.pathname === '/me') {
      return send(res, 404, 'application/json', '{"message":"no Route matched with those values"}\n');
    }
    // Spring's default error body, in front of an IdP being deployed: an `error` in its words.
    if ((outage === 'userinfo-spring-404' && url.pathname === '/me') || outage === 'spring-404') {
      return send(res, 404, 'application/json', JSON.stringify({ timestamp: new Date().toISOString(), status: 404, error: 'Not Found', path: url.pathname }) + '\n');
    }
    if (outage === 'userinfo-page' && url.pathname === '/me') {
      return send(res, 200, 'text/html', '<!doctype html><title>Down for maintenance</title>\n');
    }
    if (outage === 'jwks' && url.pathname === '/jwks') return send(res, 503, 'text/plain', 'key set outage\n');
    if (outage === 'jwks-empty' && url.pathname === '/jwks') return send(res, 200, 'application/json', '{"keys":[]}');
    // An answer about someone else: OpenID Connect Core §5.3.2 has the client check its `sub`.
    if (outage === 'userinfo-other-sub' && url.pathname === '/me') {
      return send(res, 200, 'application/json', JSON.stringify({
        sub: 'someone-else', email: 'someone-else@example.com', email_verified: true, groups: ['eng'],
      }) + '\n');
    }
    if (outage === 'userinfo-refuses' && url.pathname === '/me') {
      return send(res, 401, 'application/json', '{"error":"invalid_token"}\n', {
        'www-authenticate': 'Bearer error="invalid_token", error_description="the token is for another API"',
      });
    }
    // A gateway in front (Kong, an API gateway) answering for an IdP it cannot reach, in JSON.
    if (outage === 'gateway') {
      return send(res, 502, 'application/json', '{"message":"failure to get a peer from the ring-balancer"}\n');
    }
    // An IdP failing inside (Keycloak with its database down): a 500 whose JSON reads as an
    // OAuth error.
    if (outage === 'server-error') {
      return send(res, 500, 'application/json', '{"error":"unknown_error","error_description":"For more on this error consult the server log."}\n');
    }
    const current = provider;
    if (url.pathname === '/auth') rememberOfflineAccess(url);
    if (url.pathname.startsWith('/interaction/')) return await handleInteraction(current, req, res, url);
    return current.callback()(req, res);
  } catch (err) {
    console.error('idp request error', err);
    if (!res.headersSent) send(res, 500, 'text/plain', `${err.message}\n`);
    else res.destroy();
  }
});
// Tests may hold idle keep-alive connections; do not let them pin the process on exit.
server.keepAliveTimeout = 5000;

server.listen(setup.port ?? 0, '127.0.0.1', () => {
  const { port } = server.address();
  phase('listening');
  issuer = substitutePort(setup.issuer ?? 'http://127.0.0.1:{port}', port);
  clientsConfig = substitutePort(setup.clients || [], port).map((c) =>
    profile === 'entra' ? { subject_type: 'pairwise', ...c } : c,
  );
  try {
    provider = buildProvider(issuer, clientsConfig);
  } catch (err) {
    console.error('invalid setup:', err.message);
    process.exit(2);
  }
  process.stdout.write(`ready ${JSON.stringify({ port, issuer })}\n`);
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => process.exit(0));
}
// The harness holds our stdin open; when it goes away, so do we (IDP_DETACHED=1 opts out, for
// the demo, which runs us in the background and stops us with a signal).
if (process.argv[2] && process.argv[2] !== '-' && process.env.IDP_DETACHED !== '1') {
  process.stdin.on('end', () => process.exit(0));
  process.stdin.on('error', () => process.exit(0));
  process.stdin.resume();
}
