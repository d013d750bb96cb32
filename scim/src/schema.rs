//! The schemas Portcullis serves (RFC 7643 §4, §8.7): core User, the Enterprise User
//! extension and core Group, as static tables, plus name resolution and the `/Schemas` and
//! `/ResourceTypes` documents built from the same tables.
//!
//! Everything that needs to know an attribute's type, case-exactness, mutability or `returned`
//! rule (filter evaluation, PATCH, validation, projection) asks [`resolve_path`], so the
//! discovery documents and the behaviour cannot drift apart.
//!
//! The common attributes `id`, `externalId` and `meta` (RFC 7643 §3.1) live at the root of
//! every resource but belong to no schema: they are resolved as part of the core schema and
//! left out of the `/Schemas` document, as in RFC 7643 §8.7.1. `schemas` itself is handled by
//! the callers, not resolved here.

use serde_json::{json, Map, Value};

use crate::filter::AttrPath;
use AttrType::{Boolean, Complex, DateTime, Reference, String as Str};
use Mutability::{Immutable, ReadOnly, WriteOnly};

pub const USER_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:User";
pub const ENTERPRISE_USER_SCHEMA: &str =
    "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User";
pub const GROUP_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:Group";
/// draft-abbey-scim-agent-extension-00 §5.1.
pub const AGENT_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:Agent";
/// draft-abbey-scim-agent-extension-00 §5.2.
pub const AGENTIC_APPLICATION_SCHEMA: &str =
    "urn:ietf:params:scim:schemas:core:2.0:AgenticApplication";
/// Portcullis' own Agent extension: what an IdP must be able to set but the draft makes
/// read-only (`owners`, `applications`), and `expires`.
pub const PORTCULLIS_AGENT_SCHEMA: &str = "urn:portcullis:params:scim:schemas:extension:2.0:Agent";
/// Microsoft Entra ID names this beside the core schema when it creates a Group (Microsoft's
/// SCIM endpoint guide shows it so). It carries no attribute: a marker, accepted and dropped.
pub const ENTRA_GROUP_MARKER: &str =
    "http://schemas.microsoft.com/2006/11/ResourceManagement/ADSCIM/2.0/Group";
pub const SCHEMA_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:Schema";
pub const RESOURCE_TYPE_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:ResourceType";

static USER_EXTENSIONS: [&SchemaDef; 1] = [&ENTERPRISE_USER];
static AGENT_EXTENSIONS: [&SchemaDef; 1] = [&PORTCULLIS_AGENT];

/// The resource types served under `/Users`, `/Groups`, `/Agents` and `/AgenticApplications`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ResourceType {
    User,
    Group,
    Agent,
    AgenticApplication,
}

impl ResourceType {
    /// Every resource type, in `/ResourceTypes` order.
    pub const ALL: [ResourceType; 4] = [
        Self::User,
        Self::Group,
        Self::Agent,
        Self::AgenticApplication,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::User => "User",
            Self::Group => "Group",
            Self::Agent => "Agent",
            Self::AgenticApplication => "AgenticApplication",
        }
    }

    pub fn endpoint(self) -> &'static str {
        match self {
            Self::User => "/Users",
            Self::Group => "/Groups",
            Self::Agent => "/Agents",
            Self::AgenticApplication => "/AgenticApplications",
        }
    }

    /// The type whose endpoint is `/{segment}`.
    pub fn from_endpoint(segment: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|rt| rt.endpoint().get(1..) == Some(segment))
    }

    /// The type called `name` (as in `/ResourceTypes/{name}` and a member's `type`).
    pub fn named(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|rt| rt.name() == name)
    }

    /// The attribute that names a resource of this type, unique among them (compared
    /// case-insensitively).
    pub fn name_attribute(self) -> &'static str {
        match self {
            Self::User => "userName",
            Self::Group => "displayName",
            Self::Agent | Self::AgenticApplication => "name",
        }
    }

    /// Whether a resource of this type can be a member of a Group.
    pub fn can_be_member(self) -> bool {
        self != Self::AgenticApplication
    }

    pub fn core_schema(self) -> &'static SchemaDef {
        match self {
            Self::User => &USER,
            Self::Group => &GROUP,
            Self::Agent => &AGENT,
            Self::AgenticApplication => &AGENTIC_APPLICATION,
        }
    }

    /// Schema extensions this resource type accepts (none of them required).
    pub fn extensions(self) -> &'static [&'static SchemaDef] {
        match self {
            Self::User => &USER_EXTENSIONS,
            Self::Agent => &AGENT_EXTENSIONS,
            Self::Group | Self::AgenticApplication => &[],
        }
    }

    /// Whether `urn` is a schema an IdP names for this type that carries no attribute, so
    /// that `schemas` may hold it and the stored resource does not.
    pub fn is_marker(self, urn: &str) -> bool {
        self == Self::Group && urn.eq_ignore_ascii_case(ENTRA_GROUP_MARKER)
    }

    /// The extension whose URN is `urn`, ignoring ASCII case.
    pub fn extension(self, urn: &str) -> Option<&'static SchemaDef> {
        self.extensions()
            .iter()
            .copied()
            .find(|s| s.id.eq_ignore_ascii_case(urn))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttrType {
    String,
    Boolean,
    Decimal,
    Integer,
    DateTime,
    Binary,
    Reference,
    Complex,
}

impl AttrType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::String => "string",
            Self::Boolean => "boolean",
            Self::Decimal => "decimal",
            Self::Integer => "integer",
            Self::DateTime => "dateTime",
            Self::Binary => "binary",
            Self::Reference => "reference",
            Self::Complex => "complex",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutability {
    ReadOnly,
    ReadWrite,
    Immutable,
    WriteOnly,
}

impl Mutability {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ReadOnly => "readOnly",
            Self::ReadWrite => "readWrite",
            Self::Immutable => "immutable",
            Self::WriteOnly => "writeOnly",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Returned {
    Always,
    Never,
    Default,
    Request,
}

impl Returned {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "always",
            Self::Never => "never",
            Self::Default => "default",
            Self::Request => "request",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Uniqueness {
    None,
    Server,
    Global,
}

impl Uniqueness {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Server => "server",
            Self::Global => "global",
        }
    }
}

/// One attribute definition (RFC 7643 §7). Built with the `const fn` helpers below so the
/// tables read like the RFC's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttributeDef {
    pub name: &'static str,
    pub ty: AttrType,
    pub multi_valued: bool,
    pub description: &'static str,
    pub required: bool,
    pub case_exact: bool,
    pub mutability: Mutability,
    pub returned: Returned,
    pub uniqueness: Uniqueness,
    pub canonical_values: &'static [&'static str],
    pub reference_types: &'static [&'static str],
    pub sub_attributes: &'static [AttributeDef],
}

impl AttributeDef {
    const fn new(name: &'static str, ty: AttrType, description: &'static str) -> Self {
        Self {
            name,
            ty,
            multi_valued: false,
            description,
            required: false,
            case_exact: false,
            mutability: Mutability::ReadWrite,
            returned: Returned::Default,
            uniqueness: Uniqueness::None,
            canonical_values: &[],
            reference_types: &[],
            sub_attributes: &[],
        }
    }

    const fn multi(mut self) -> Self {
        self.multi_valued = true;
        self
    }

    const fn required(mut self) -> Self {
        self.required = true;
        self
    }

    const fn case_exact(mut self) -> Self {
        self.case_exact = true;
        self
    }

    const fn mutability(mut self, m: Mutability) -> Self {
        self.mutability = m;
        self
    }

    const fn returned(mut self, r: Returned) -> Self {
        self.returned = r;
        self
    }

    const fn unique(mut self) -> Self {
        self.uniqueness = Uniqueness::Server;
        self
    }

    const fn canonical(mut self, values: &'static [&'static str]) -> Self {
        self.canonical_values = values;
        self
    }

    const fn refs(mut self, types: &'static [&'static str]) -> Self {
        self.reference_types = types;
        self
    }

    const fn sub(mut self, subs: &'static [AttributeDef]) -> Self {
        self.sub_attributes = subs;
        self
    }

    /// The sub-attribute called `name`, ignoring ASCII case.
    pub fn sub_attribute(&self, name: &str) -> Option<&'static AttributeDef> {
        find(self.sub_attributes, name)
    }

    pub fn is_read_only(&self) -> bool {
        self.mutability == Mutability::ReadOnly
    }
}

/// A schema (RFC 7643 §7): its URN, name and attributes.
#[derive(Debug, PartialEq, Eq)]
pub struct SchemaDef {
    pub id: &'static str,
    pub name: &'static str,
    pub description: &'static str,
    pub attributes: &'static [AttributeDef],
    /// Whether its attributes live in an object keyed by [`Self::id`] rather than at the root.
    pub is_extension: bool,
}

impl SchemaDef {
    pub fn attribute(&self, name: &str) -> Option<&'static AttributeDef> {
        find(self.attributes, name)
    }
}

fn find(defs: &'static [AttributeDef], name: &str) -> Option<&'static AttributeDef> {
    defs.iter().find(|d| d.name.eq_ignore_ascii_case(name))
}

const fn string(name: &'static str, description: &'static str) -> AttributeDef {
    AttributeDef::new(name, Str, description)
}

/// `value`, `display`, `type`, `primary`: the shape of most multi-valued attributes.
macro_rules! multi_value_subs {
    ($value:expr, $types:expr) => {
        &[
            $value,
            string(
                "display",
                "A human-readable name, primarily used for display purposes.",
            ),
            string("type", "A label indicating the attribute's function.").canonical($types),
            AttributeDef::new(
                "primary",
                Boolean,
                "Whether this is the preferred value among the attribute's values.",
            ),
        ]
    };
}

/// The sub-attributes of `entitlements`, `roles` and `x509Certificates`, the same for Users
/// and Agents (RFC 7643 §4.1.2; draft-abbey-scim-agent-extension-00 §6.1).
const ENTITLEMENT_SUBS: &[AttributeDef] =
    multi_value_subs!(string("value", "The value of an entitlement."), &[]);
const ROLE_SUBS: &[AttributeDef] = multi_value_subs!(string("value", "The value of a role."), &[]);
const CERTIFICATE_SUBS: &[AttributeDef] = multi_value_subs!(
    AttributeDef::new(
        "value",
        AttrType::Binary,
        "The value of an X.509 certificate."
    )
    .case_exact(),
    &[]
);

/// `id`, `externalId`, `meta` (RFC 7643 §3.1), resolved as part of every core schema.
pub static COMMON_ATTRIBUTES: &[AttributeDef] = &[
    string(
        "id",
        "Unique identifier for the resource, assigned by the service provider.",
    )
    .case_exact()
    .mutability(ReadOnly)
    .returned(Returned::Always)
    .unique(),
    string(
        "externalId",
        "Identifier of the resource as defined by the provisioning client.",
    )
    .case_exact(),
    AttributeDef::new("meta", Complex, "Resource metadata.")
        .mutability(ReadOnly)
        .sub(&[
            string(
                "resourceType",
                "The name of the resource type of the resource.",
            )
            .case_exact()
            .mutability(ReadOnly),
            AttributeDef::new("created", DateTime, "When the resource was added.")
                .mutability(ReadOnly),
            AttributeDef::new(
                "lastModified",
                DateTime,
                "When the resource was last changed.",
            )
            .mutability(ReadOnly),
            AttributeDef::new("location", Reference, "The URI of the resource.")
                .case_exact()
                .mutability(ReadOnly)
                .refs(&["uri"]),
            string("version", "The version (ETag) of the resource.")
                .case_exact()
                .mutability(ReadOnly),
        ]),
];

pub static USER: SchemaDef = SchemaDef {
    id: USER_SCHEMA,
    name: "User",
    description: "User Account",
    is_extension: false,
    attributes: &[
        string(
            "userName",
            "Unique identifier for the User, used to sign in.",
        )
        .required()
        .unique(),
        AttributeDef::new("name", Complex, "The components of the user's real name.").sub(&[
            string("formatted", "The full name, formatted for display."),
            string("familyName", "The family name of the User."),
            string("givenName", "The given name of the User."),
            string("middleName", "The middle name(s) of the User."),
            string("honorificPrefix", "The honorific prefix(es) of the User."),
            string("honorificSuffix", "The honorific suffix(es) of the User."),
        ]),
        string(
            "displayName",
            "The name of the User, suitable for display to end-users.",
        ),
        string("nickName", "The casual way to address the user."),
        AttributeDef::new(
            "profileUrl",
            Reference,
            "A URI of the User's online profile.",
        )
        .refs(&["external"]),
        string("title", "The user's title, such as \"Vice President\"."),
        string(
            "userType",
            "The relationship between the organization and the user.",
        ),
        string(
            "preferredLanguage",
            "The User's preferred written or spoken language.",
        ),
        string(
            "locale",
            "The User's default location, for localizing values.",
        ),
        string(
            "timezone",
            "The User's time zone in the Olson database format.",
        ),
        AttributeDef::new("active", Boolean, "The User's administrative status."),
        string(
            "password",
            "The User's cleartext password, stored only as a hash.",
        )
        .mutability(WriteOnly)
        .returned(Returned::Never),
        AttributeDef::new("emails", Complex, "Email addresses for the user.")
            .multi()
            .sub(multi_value_subs!(
                string("value", "Email address for the user."),
                &["work", "home", "other"]
            )),
        AttributeDef::new("phoneNumbers", Complex, "Phone numbers for the User.")
            .multi()
            .sub(multi_value_subs!(
                string("value", "Phone number of the User."),
                &["work", "home", "mobile", "fax", "pager", "other"]
            )),
        AttributeDef::new("ims", Complex, "Instant messaging addresses for the User.")
            .multi()
            .sub(multi_value_subs!(
                string("value", "Instant messaging address for the User."),
                &["aim", "gtalk", "icq", "xmpp", "msn", "skype", "qq", "yahoo"]
            )),
        AttributeDef::new("photos", Complex, "URLs of photos of the User.")
            .multi()
            .sub(multi_value_subs!(
                AttributeDef::new("value", Reference, "URL of a photo of the User.")
                    .refs(&["external"]),
                &["photo", "thumbnail"]
            )),
        AttributeDef::new(
            "addresses",
            Complex,
            "A physical mailing address for this User.",
        )
        .multi()
        .sub(&[
            string(
                "formatted",
                "The full mailing address, formatted for display.",
            ),
            string("streetAddress", "The full street address component."),
            string("locality", "The city or locality component."),
            string("region", "The state or region component."),
            string("postalCode", "The zip code or postal code component."),
            string("country", "The country name component."),
            string("type", "A label indicating the attribute's function.")
                .canonical(&["work", "home", "other"]),
            AttributeDef::new("primary", Boolean, "Whether this is the preferred address."),
        ]),
        GROUPS_OF_MEMBER,
        AttributeDef::new(
            "entitlements",
            Complex,
            "A list of entitlements for the User.",
        )
        .multi()
        .sub(ENTITLEMENT_SUBS),
        AttributeDef::new("roles", Complex, "A list of roles for the User.")
            .multi()
            .sub(ROLE_SUBS),
        AttributeDef::new(
            "x509Certificates",
            Complex,
            "Certificates issued to the User.",
        )
        .multi()
        .sub(CERTIFICATE_SUBS),
    ],
};

pub static ENTERPRISE_USER: SchemaDef = SchemaDef {
    id: ENTERPRISE_USER_SCHEMA,
    name: "EnterpriseUser",
    description: "Enterprise User",
    is_extension: true,
    attributes: &[
        string(
            "employeeNumber",
            "Numeric or alphanumeric identifier assigned to a person.",
        ),
        string("costCenter", "Identifies the name of a cost center."),
        string("organization", "Identifies the name of an organization."),
        string("division", "Identifies the name of a division."),
        string("department", "Identifies the name of a department."),
        AttributeDef::new("manager", Complex, "The User's manager.").sub(&[
            string(
                "value",
                "The id of the SCIM resource representing the User's manager.",
            )
            .required(),
            AttributeDef::new("$ref", Reference, "The URI of the manager's resource.")
                .refs(&["User"]),
            string("displayName", "The displayName of the User's manager.").mutability(ReadOnly),
        ]),
    ],
};

pub static GROUP: SchemaDef = SchemaDef {
    id: GROUP_SCHEMA,
    name: "Group",
    description: "Group",
    is_extension: false,
    attributes: &[
        // RFC 7643 says uniqueness "none"; Entra ID relies on displayName being unique.
        string("displayName", "A human-readable name for the Group.")
            .required()
            .unique(),
        AttributeDef::new("members", Complex, "A list of members of the Group.")
            .multi()
            .sub(&[
                string("value", "Identifier of the member of this Group.")
                    .case_exact()
                    .mutability(Immutable),
                AttributeDef::new("$ref", Reference, "The URI of the member resource.")
                    .mutability(Immutable)
                    .refs(&["User", "Group", "Agent"]),
                string("display", "A human-readable name of the member.").mutability(ReadOnly),
                // "Agent" is Portcullis' addition: the agent draft has agents in groups (its
                // read-only `groups`) but no member type for them.
                string("type", "The type of the member.")
                    .mutability(Immutable)
                    .canonical(&["User", "Group", "Agent"]),
            ]),
    ],
};

/// A User's or Agent's read-only `groups`.
const GROUPS_OF_MEMBER: AttributeDef = AttributeDef::new(
    "groups",
    Complex,
    "Groups the resource belongs to, directly or not.",
)
.multi()
.mutability(ReadOnly)
.sub(&[
    string("value", "The identifier of the group.").mutability(ReadOnly),
    AttributeDef::new("$ref", Reference, "The URI of the Group.")
        .mutability(ReadOnly)
        .refs(&["User", "Group"]),
    string("display", "A human-readable name of the group.").mutability(ReadOnly),
    string("type", "How the membership was derived.")
        .mutability(ReadOnly)
        .canonical(&["direct", "indirect"]),
]);

/// `value`, `$ref`, `display` pointing at other resources.
macro_rules! reference_subs {
    ($mutability:expr, $types:expr) => {
        &[
            string("value", "The id of the referenced resource.")
                .case_exact()
                .mutability($mutability),
            AttributeDef::new("$ref", Reference, "The URI of the referenced resource.")
                .mutability($mutability)
                .refs($types),
            string(
                "display",
                "A human-readable name of the referenced resource.",
            )
            .mutability(ReadOnly),
        ]
    };
}

/// The Agent of draft-abbey-scim-agent-extension-00 §5.1 and §6.1, with `displayName` and
/// `description`, which its prose has and its schema JSON lacks.
///
/// Where draft-wzdk-scim-agent-resource-00 differs: it calls the agent's identifier
/// `agentUserName` rather than `name`, has no AgenticApplication resource (nor `applications`,
/// `parent` or `protocols`), and its `owners` point at Users only. Portcullis serves the first
/// draft's names; an IdP on the second maps `agentUserName` to `name`.
pub static AGENT: SchemaDef = SchemaDef {
    id: AGENT_SCHEMA,
    name: "Agent",
    description: "An AI agent",
    is_extension: false,
    attributes: &[
        string(
            "name",
            "Unique identifier for the Agent, typically used by the agent to authenticate.",
        )
        .required()
        .unique(),
        string(
            "displayName",
            "The name of the Agent, suitable for display.",
        ),
        string("description", "What the Agent is for."),
        string("agentType", "The kind of agent, such as 'Assistant'."),
        AttributeDef::new("active", Boolean, "Whether the Agent may authenticate."),
        GROUPS_OF_MEMBER,
        AttributeDef::new("entitlements", Complex, "Entitlements of the Agent.")
            .multi()
            .sub(ENTITLEMENT_SUBS),
        AttributeDef::new("roles", Complex, "Roles of the Agent.")
            .multi()
            .sub(ROLE_SUBS),
        AttributeDef::new(
            "x509Certificates",
            Complex,
            "Certificates issued to the Agent.",
        )
        .multi()
        .sub(CERTIFICATE_SUBS),
        // The draft makes `applications` and `owners` read-only without saying who sets them;
        // Portcullis fills them from its extension (PORTCULLIS_AGENT), which an IdP can write.
        AttributeDef::new(
            "applications",
            Complex,
            "The AgenticApplications the Agent belongs to.",
        )
        .multi()
        .mutability(ReadOnly)
        .sub(reference_subs!(ReadOnly, &["AgenticApplication"])),
        string(
            "subject",
            "The subject by which the Agent is known to a federated token issuer.",
        )
        .mutability(ReadOnly),
        AttributeDef::new(
            "owners",
            Complex,
            "The Users or Groups accountable for the Agent.",
        )
        .multi()
        .mutability(ReadOnly)
        .sub(reference_subs!(ReadOnly, &["User", "Group"])),
        AttributeDef::new("protocols", Complex, "The protocols the Agent supports.")
            .multi()
            .mutability(ReadOnly)
            .sub(&[
                string("type", "The protocol, such as A2A, OpenAPI or MCP-Server.")
                    .mutability(ReadOnly),
                AttributeDef::new(
                    "specificationUrl",
                    Reference,
                    "Where the protocol's description of the Agent is.",
                )
                .mutability(ReadOnly)
                .refs(&["external"]),
            ]),
        AttributeDef::new("parent", Complex, "The Agent this one belongs to.")
            .mutability(ReadOnly)
            .sub(reference_subs!(ReadOnly, &["Agent"])),
    ],
};

/// What decides whether an agent is admitted, settable by an IdP (see [`AGENT`]).
pub static PORTCULLIS_AGENT: SchemaDef = SchemaDef {
    id: PORTCULLIS_AGENT_SCHEMA,
    name: "PortcullisAgent",
    description: "Who answers for an Agent, where it runs, and until when it may act",
    is_extension: true,
    attributes: &[
        AttributeDef::new(
            "owners",
            Complex,
            "Users, or Groups whose members, accountable for the Agent: it is admitted only \
             while one of them is an active User.",
        )
        .multi()
        .sub(&[
            string("value", "The id of the owning User or Group.").case_exact(),
            AttributeDef::new("$ref", Reference, "The URI of the owner.").refs(&["User", "Group"]),
            string("display", "A human-readable name of the owner.").mutability(ReadOnly),
            string("type", "The type of the owner.").canonical(&["User", "Group"]),
        ]),
        AttributeDef::new(
            "applications",
            Complex,
            "The AgenticApplications the Agent runs in: it is admitted only while all are \
             active.",
        )
        .multi()
        .sub(&[
            string("value", "The id of the AgenticApplication.").case_exact(),
            AttributeDef::new("$ref", Reference, "The URI of the AgenticApplication.")
                .refs(&["AgenticApplication"]),
            string("display", "A human-readable name of the application.").mutability(ReadOnly),
        ]),
        AttributeDef::new(
            "expires",
            DateTime,
            "When the Agent stops being admitted, whatever else holds.",
        ),
    ],
};

/// The AgenticApplication of draft-abbey-scim-agent-extension-00 §5.2. That draft describes
/// its attributes in prose only; their characteristics here follow the authors' later
/// editor's copy.
pub static AGENTIC_APPLICATION: SchemaDef = SchemaDef {
    id: AGENTIC_APPLICATION_SCHEMA,
    name: "AgenticApplication",
    description: "Applications that host or provide access to agents",
    is_extension: false,
    attributes: &[
        string("name", "The name of the Agentic Application.")
            .required()
            .unique(),
        string(
            "displayName",
            "The name of the application, suitable for display.",
        ),
        string("description", "What the application is for."),
        AttributeDef::new(
            "active",
            Boolean,
            "Whether the application is operational: agents in an inactive one are refused.",
        ),
        AttributeDef::new("applicationUrls", Complex, "URLs of the application.")
            .multi()
            .sub(&[
                string("value", "The URL."),
                string("type", "What the URL is for.").canonical(&[
                    "ssoEndpoint",
                    "loginPage",
                    "api",
                    "homepage",
                ]),
                AttributeDef::new("primary", Boolean, "Whether this is the preferred URL."),
                string("description", "What the URL is for, in words."),
            ]),
        AttributeDef::new(
            "lastAccessed",
            DateTime,
            "When an agent or user last used the application.",
        )
        .mutability(ReadOnly),
        AttributeDef::new(
            "oAuthConfiguration",
            Complex,
            "How the application takes part in OAuth.",
        )
        .multi()
        .sub(&[
            string("clientId", "The OAuth client identifier (RFC 6749 §2.2)."),
            string("description", "What this configuration is for."),
            string("audienceUri", "The audience (RFC 7519 §4.1.3)."),
            string("issuerUri", "The issuer (RFC 7519 §4.1.1)."),
            AttributeDef::new("redirectUri", Reference, "Redirection endpoints.")
                .multi()
                .refs(&["uri"]),
        ]),
        AttributeDef::new("agents", Complex, "Agents the application exposes.")
            .multi()
            .sub(&[
                string("value", "The id of the Agent.").case_exact(),
                AttributeDef::new("$ref", Reference, "The URI of the Agent.")
                    .mutability(ReadOnly)
                    .refs(&["Agent"]),
                string("display", "The name of the Agent.").mutability(ReadOnly),
                string("type", "How the application relates to the Agent.").canonical(&[
                    "owned",
                    "authorized",
                    "guest",
                ]),
            ]),
        AttributeDef::new(
            "externalIdentifiers",
            Complex,
            "Identifiers of the application in other systems.",
        )
        .multi()
        .sub(&[
            string("type", "The kind of identifier."),
            string("value", "The identifier."),
            string("system", "The system that assigned it."),
        ]),
    ],
};

/// An attribute path resolved against a resource type's schemas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    /// The schema holding the attribute (the core schema for `id`, `externalId`, `meta`).
    pub schema: &'static SchemaDef,
    pub attr: &'static AttributeDef,
    pub sub: Option<&'static AttributeDef>,
}

impl Resolved {
    /// The definition the path ends at: the sub-attribute if there is one.
    pub fn leaf(&self) -> &'static AttributeDef {
        self.sub.unwrap_or(self.attr)
    }
}

/// Resolves `[schema:]name[.sub]` for `rt`, ignoring case. A bare name means the core schema
/// (RFC 7644 §3.10 lets clients omit only the core URN), so extension attributes need their URN.
pub fn resolve_path(rt: ResourceType, path: &AttrPath) -> Option<Resolved> {
    let schema = match &path.schema {
        None => rt.core_schema(),
        Some(urn) if urn.eq_ignore_ascii_case(rt.core_schema().id) => rt.core_schema(),
        Some(urn) => rt.extension(urn)?,
    };
    let attr = schema.attribute(&path.name).or_else(|| {
        (!schema.is_extension)
            .then(|| find(COMMON_ATTRIBUTES, &path.name))
            .flatten()
    })?;
    let sub = match &path.sub_attr {
        None => None,
        Some(sub) => Some(attr.sub_attribute(sub)?),
    };
    Some(Resolved { schema, attr, sub })
}

/// The definition `path` ends at (see [`resolve_path`]).
pub fn resolve(rt: ResourceType, path: &AttrPath) -> Option<&'static AttributeDef> {
    resolve_path(rt, path).map(|r| r.leaf())
}

/// When `path` is an extension URN itself (`urn:…:enterprise:2.0:User`, which the grammar
/// reads as schema `urn:…:2.0` and name `User`), that extension.
pub fn extension_named_by(rt: ResourceType, path: &AttrPath) -> Option<&'static SchemaDef> {
    let schema = path.schema.as_deref()?;
    if path.sub_attr.is_some() {
        return None;
    }
    let urn = format!("{schema}:{}", path.name);
    rt.extension(&urn)
}

/// The RFC 7643 §7 representation of one attribute.
fn attribute_json(def: &AttributeDef) -> Value {
    let mut out = Map::new();
    out.insert("name".into(), def.name.into());
    out.insert("type".into(), def.ty.as_str().into());
    out.insert("multiValued".into(), def.multi_valued.into());
    out.insert("description".into(), def.description.into());
    out.insert("required".into(), def.required.into());
    if !def.canonical_values.is_empty() {
        out.insert("canonicalValues".into(), def.canonical_values.into());
    }
    if def.ty != Complex {
        out.insert("caseExact".into(), def.case_exact.into());
    }
    out.insert("mutability".into(), def.mutability.as_str().into());
    out.insert("returned".into(), def.returned.as_str().into());
    out.insert("uniqueness".into(), def.uniqueness.as_str().into());
    if def.ty == Reference {
        out.insert("referenceTypes".into(), def.reference_types.into());
    }
    if !def.sub_attributes.is_empty() {
        let subs = def.sub_attributes.iter().map(attribute_json).collect();
        out.insert("subAttributes".into(), Value::Array(subs));
    }
    Value::Object(out)
}

/// The `/Schemas/{id}` document of one schema. `base` is the SCIM base URL without a
/// trailing slash (`https://auth.example.com/scim/v2`).
pub fn schema_json(schema: &SchemaDef, base: &str) -> Value {
    json!({
        "schemas": [SCHEMA_SCHEMA],
        "id": schema.id,
        "name": schema.name,
        "description": schema.description,
        "attributes": schema.attributes.iter().map(attribute_json).collect::<Vec<_>>(),
        "meta": {
            "resourceType": "Schema",
            "location": format!("{base}/Schemas/{}", schema.id),
        },
    })
}

/// Every schema served, in `/Schemas` order.
pub fn all_schemas() -> [&'static SchemaDef; 6] {
    [
        &USER,
        &ENTERPRISE_USER,
        &GROUP,
        &AGENT,
        &PORTCULLIS_AGENT,
        &AGENTIC_APPLICATION,
    ]
}

/// The `/Schemas` resources (wrap them in a ListResponse to answer `GET /Schemas`).
pub fn schemas_json(base: &str) -> Vec<Value> {
    all_schemas()
        .iter()
        .map(|schema| schema_json(schema, base))
        .collect()
}

/// The `/ResourceTypes/{name}` document of one resource type (RFC 7643 §6).
pub fn resource_type_json(rt: ResourceType, base: &str) -> Value {
    let extensions: Vec<Value> = rt
        .extensions()
        .iter()
        .map(|ext| json!({ "schema": ext.id, "required": false }))
        .collect();
    json!({
        "schemas": [RESOURCE_TYPE_SCHEMA],
        "id": rt.name(),
        "name": rt.name(),
        "endpoint": rt.endpoint(),
        "description": rt.core_schema().description,
        "schema": rt.core_schema().id,
        "schemaExtensions": extensions,
        "meta": {
            "resourceType": "ResourceType",
            "location": format!("{base}/ResourceTypes/{}", rt.name()),
        },
    })
}

/// The `/ResourceTypes` resources: User (with the enterprise extension), Group, Agent (with
/// Portcullis' extension) and AgenticApplication.
pub fn resource_types_json(base: &str) -> Vec<Value> {
    ResourceType::ALL
        .into_iter()
        .map(|rt| resource_type_json(rt, base))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::Filter;

    fn path(text: &str) -> AttrPath {
        match Filter::parse(&format!("{text} pr")).unwrap() {
            Filter::Attr(expr) => expr.path,
            other => panic!("not a path: {other:?}"),
        }
    }

    #[test]
    fn resolves_names_case_insensitively_with_or_without_urn() {
        let user = ResourceType::User;
        assert_eq!(resolve(user, &path("userName")).unwrap().name, "userName");
        assert_eq!(resolve(user, &path("USERNAME")).unwrap().name, "userName");
        let qualified = path("urn:ietf:params:scim:schemas:core:2.0:user:name.GivenName");
        assert_eq!(resolve(user, &qualified).unwrap().name, "givenName");
        let dept = resolve_path(
            user,
            &path("urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department"),
        )
        .unwrap();
        assert!(dept.schema.is_extension);
        assert_eq!(dept.attr.name, "department");
        let manager =
            path("urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager.value");
        assert_eq!(resolve(user, &manager).unwrap().name, "value");
        assert_eq!(resolve(user, &path("emails.value")).unwrap().ty, Str);
        assert_eq!(
            resolve(user, &path("meta.lastModified")).unwrap().ty,
            DateTime
        );
        assert!(resolve(user, &path("id")).unwrap().case_exact);
        assert!(resolve(user, &path("externalId")).unwrap().case_exact);
        assert!(!resolve(user, &path("userName")).unwrap().case_exact);
    }

    #[test]
    fn rejects_what_is_not_in_the_schema() {
        let user = ResourceType::User;
        assert_eq!(resolve(user, &path("nope")), None);
        assert_eq!(resolve(user, &path("name.nope")), None);
        assert_eq!(resolve(user, &path("members")), None, "a Group attribute");
        // Extension attributes need their URN, and common attributes are not in extensions.
        assert_eq!(resolve(user, &path("department")), None);
        let ext_id = path("urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:id");
        assert_eq!(resolve(user, &ext_id), None);
        assert_eq!(resolve(user, &path("urn:x:y:userName")), None);
        let group_ext =
            path("urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department");
        assert_eq!(resolve(ResourceType::Group, &group_ext), None);
    }

    #[test]
    fn group_members_have_value_ref_display_type() {
        let members = resolve(ResourceType::Group, &path("members")).unwrap();
        let names: Vec<_> = members.sub_attributes.iter().map(|s| s.name).collect();
        assert_eq!(names, ["value", "$ref", "display", "type"]);
        assert!(members.multi_valued);
        assert_eq!(
            resolve(ResourceType::Group, &path("members.$ref"))
                .unwrap()
                .ty,
            Reference
        );
    }

    #[test]
    fn password_is_write_only_and_never_returned() {
        let password = resolve(ResourceType::User, &path("password")).unwrap();
        assert_eq!(password.mutability, WriteOnly);
        assert_eq!(password.returned, Returned::Never);
    }

    #[test]
    fn names_an_extension_by_its_urn() {
        let urn = path("urn:ietf:params:scim:schemas:extension:enterprise:2.0:user");
        assert_eq!(
            extension_named_by(ResourceType::User, &urn).map(|s| s.id),
            Some(ENTERPRISE_USER_SCHEMA)
        );
        assert_eq!(extension_named_by(ResourceType::Group, &urn), None);
        assert_eq!(
            extension_named_by(ResourceType::User, &path("userName")),
            None
        );
    }

    #[test]
    fn schemas_document_follows_rfc_7643_section_7() {
        let docs = schemas_json("https://auth.example.com/scim/v2");
        assert_eq!(docs.len(), 6);
        let user = &docs[0];
        assert_eq!(user["schemas"], json!([SCHEMA_SCHEMA]));
        assert_eq!(user["id"], USER_SCHEMA);
        assert_eq!(
            user["meta"]["location"],
            format!("https://auth.example.com/scim/v2/Schemas/{USER_SCHEMA}")
        );
        let attrs = user["attributes"].as_array().unwrap();
        let user_name = attrs.iter().find(|a| a["name"] == "userName").unwrap();
        assert_eq!(
            *user_name,
            json!({
                "name": "userName",
                "type": "string",
                "multiValued": false,
                "description": "Unique identifier for the User, used to sign in.",
                "required": true,
                "caseExact": false,
                "mutability": "readWrite",
                "returned": "default",
                "uniqueness": "server",
            })
        );
        let emails = attrs.iter().find(|a| a["name"] == "emails").unwrap();
        assert_eq!(emails["multiValued"], true);
        assert_eq!(
            emails["subAttributes"][2]["canonicalValues"],
            json!(["work", "home", "other"])
        );
        assert!(
            attrs.iter().all(|a| a["name"] != "id"),
            "common attributes are not listed"
        );
        let profile = attrs.iter().find(|a| a["name"] == "profileUrl").unwrap();
        assert_eq!(profile["referenceTypes"], json!(["external"]));
        assert_eq!(docs[1]["id"], ENTERPRISE_USER_SCHEMA);
        assert_eq!(docs[2]["attributes"][1]["subAttributes"][1]["name"], "$ref");
        assert_eq!(docs[3]["id"], AGENT_SCHEMA);
        let agent_name = &docs[3]["attributes"][0];
        assert_eq!(
            (
                &agent_name["name"],
                &agent_name["required"],
                &agent_name["uniqueness"]
            ),
            (&json!("name"), &json!(true), &json!("server"))
        );
    }

    #[test]
    fn agents_keep_the_drafts_read_only_links_and_take_them_through_the_extension() {
        let agent = ResourceType::Agent;
        let owners = resolve(agent, &path("owners")).unwrap();
        assert!(owners.is_read_only());
        let urn = format!("{PORTCULLIS_AGENT_SCHEMA}:owners");
        let writable = resolve(agent, &path(&urn)).unwrap();
        assert!(!writable.is_read_only() && writable.multi_valued);
        let expires = resolve(agent, &path(&format!("{PORTCULLIS_AGENT_SCHEMA}:expires")));
        assert_eq!(expires.map(|e| e.ty), Some(DateTime));
        assert_eq!(
            ResourceType::from_endpoint("AgenticApplications"),
            Some(ResourceType::AgenticApplication)
        );
        assert_eq!(ResourceType::named("Agent"), Some(agent));
        assert!(!ResourceType::AgenticApplication.can_be_member());
    }

    #[test]
    fn resource_types_document_follows_rfc_7643_section_6() {
        let docs = resource_types_json("https://auth.example.com/scim/v2");
        assert_eq!(
            docs[0],
            json!({
                "schemas": [RESOURCE_TYPE_SCHEMA],
                "id": "User",
                "name": "User",
                "endpoint": "/Users",
                "description": "User Account",
                "schema": USER_SCHEMA,
                "schemaExtensions": [{ "schema": ENTERPRISE_USER_SCHEMA, "required": false }],
                "meta": {
                    "resourceType": "ResourceType",
                    "location": "https://auth.example.com/scim/v2/ResourceTypes/User",
                },
            })
        );
        assert_eq!(docs[1]["endpoint"], "/Groups");
        assert_eq!(docs[1]["schemaExtensions"], json!([]));
    }
}
