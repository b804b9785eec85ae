//! QAPI introspection: `query-qmp-schema`, derived from the handlers' own Rust types.
//!
//! Every command declares its argument and return types and every event its data type as a
//! [`TypeDesc`]. The typed constructors of [`Command`](crate::Command) take them from the
//! closure's types, which implement [`JsonSchema`] (`#[derive(schemars::JsonSchema)]` next
//! to `serde::Deserialize`). schemars reads the same serde attributes that decode the
//! arguments (`rename_all`, `default`, `tag`, `untagged`, `flatten`, ...), so the schema
//! cannot drift from the decoder; this module maps its JSON Schema to QAPI's
//! [`SchemaInfo`], as QEMU's `qapi/introspect.json` defines it:
//!
//! | Rust / serde | QAPI |
//! | --- | --- |
//! | `String`, `PathBuf`, `char` | `str` |
//! | every integer type | `int` (QEMU shows all its sized integers as `int`) |
//! | `f32`, `f64` | `number` |
//! | `bool` | `bool` |
//! | `serde_json::Value`, maps, anything QAPI cannot say | `any` |
//! | `Vec<T>`, slices | array `[T]` |
//! | struct | object; `Option<T>` and `#[serde(default)]` members are optional (`"default": null`) |
//! | enum of unit variants | enum |
//! | `#[serde(tag = "...")]` enum | object with `tag` and `variants` (a flat union) |
//! | `#[serde(untagged)]` enum | alternate |
//! | `()` as a return type | the empty object (the reply is `{}`) |
//!
//! Type names other than the six builtins are masked as numbers, as QEMU masks them, so
//! clients can rely only on command and event names. Identical types share one entry.
//! Members are listed in name order (JSON Schema keeps no declaration order). A recursive
//! type is cut to `any` where it refers to itself.
//!
//! The schema is computed once, when the registry is built, and serialized once, so
//! `query-qmp-schema` costs a copy of the precomputed reply.

use std::collections::{BTreeMap, HashMap};

use schemars::generate::{Contract, SchemaSettings};
use schemars::{Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use schemars::JsonSchema;

/// One entry of `query-qmp-schema`: QEMU's `SchemaInfo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SchemaInfo {
    /// The entity's name: a command or event name, a builtin type name, `[ELEMENT]` for an
    /// array, or a number for any other type.
    pub name: String,
    /// What kind of entity this is, with what describes it.
    #[serde(flatten)]
    pub meta: MetaType,
    /// QAPI features (`deprecated`, `unstable`, or the embedder's own).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
}

/// `SchemaInfo`'s flat-union part, tagged by `meta-type`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(
    tag = "meta-type",
    rename_all = "kebab-case",
    rename_all_fields = "kebab-case"
)]
pub enum MetaType {
    /// A builtin type: `str`, `int`, `number`, `bool`, `null`, `any`.
    Builtin {
        /// Its JSON type.
        json_type: JsonType,
    },
    /// An enumeration of strings.
    Enum {
        /// The values, with their features.
        members: Vec<EnumMember>,
        /// The same values as plain strings (deprecated in QEMU, still sent).
        #[schemars(extend("deprecated" = true))]
        values: Vec<String>,
    },
    /// An array.
    Array {
        /// The element type's name.
        element_type: String,
    },
    /// An object, possibly a flat union.
    Object {
        /// Its members (for a union, the common ones, tag included).
        members: Vec<ObjectMember>,
        /// For a union: the member whose value selects the variant.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tag: Option<String>,
        /// For a union: the extra members each tag value adds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        variants: Option<Vec<Variant>>,
    },
    /// A value that may be one of several types of distinct JSON kinds.
    Alternate {
        /// The possible types.
        members: Vec<AlternateMember>,
    },
    /// A command.
    Command {
        /// The arguments' object type.
        arg_type: String,
        /// The return value's type.
        ret_type: String,
        /// Present (true) when the command accepts `exec-oob`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        allow_oob: Option<bool>,
    },
    /// An event.
    Event {
        /// The data's object type.
        arg_type: String,
    },
}

/// JSON types of builtins, QEMU's `JSONType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum JsonType {
    /// A string.
    String,
    /// A number.
    Number,
    /// An integer.
    Int,
    /// A boolean.
    Boolean,
    /// `null`.
    Null,
    /// An object.
    Object,
    /// An array.
    Array,
    /// Any JSON value.
    Value,
}

/// A value of an enum type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct EnumMember {
    /// The value.
    pub name: String,
    /// Its features.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
}

/// A member of an object type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ObjectMember {
    /// The member name.
    pub name: String,
    /// `Some(())`, sent as `"default": null`, when the member is optional: QEMU shows no
    /// real default values.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    #[schemars(with = "Option<Value>")]
    pub default: Option<()>,
    /// The member's type name.
    #[serde(rename = "type")]
    pub type_: String,
    /// Its features.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
}

/// `"default": null` decodes as present.
fn present<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<()>, D::Error> {
    Value::deserialize(deserializer).map(|_| Some(()))
}

/// One case of a flat union.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Variant {
    /// The tag value.
    pub case: String,
    /// The object type of the members this case adds.
    #[serde(rename = "type")]
    pub type_: String,
}

/// One possible type of an alternate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AlternateMember {
    /// The type name.
    #[serde(rename = "type")]
    pub type_: String,
}

/// Describes a command's arguments or return value, or an event's data, for
/// `query-qmp-schema`. The typed constructors of [`Command`](crate::Command) make these from
/// their closures' types; [`Command::raw`](crate::Command::raw) starts with
/// [`TypeDesc::any`].
#[derive(Clone, Copy)]
pub struct TypeDesc(Desc);

#[derive(Clone, Copy)]
enum Desc {
    Any,
    Empty,
    /// A type as it is decoded (arguments).
    Decoded(fn(&mut SchemaGenerator) -> Schema),
    /// A type as it is encoded (returns, event data).
    Encoded(fn(&mut SchemaGenerator) -> Schema),
}

impl TypeDesc {
    /// `any`: nothing is said about the value.
    pub fn any() -> Self {
        TypeDesc(Desc::Any)
    }

    /// The empty object: no arguments, a `{}` return, an event without data.
    pub fn empty() -> Self {
        TypeDesc(Desc::Empty)
    }

    /// `T` as serde decodes it: for arguments.
    pub fn decoded<T: JsonSchema>() -> Self {
        TypeDesc(Desc::Decoded(|generator| generator.subschema_for::<T>()))
    }

    /// `T` as serde encodes it: for return values and event data. `()` is the empty object,
    /// since it is answered as `{}`.
    pub fn encoded<T: JsonSchema>() -> Self {
        TypeDesc(Desc::Encoded(|generator| generator.subschema_for::<T>()))
    }
}

impl std::fmt::Debug for TypeDesc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.0 {
            Desc::Any => "any",
            Desc::Empty => "empty",
            Desc::Decoded(_) => "decoded",
            Desc::Encoded(_) => "encoded",
        };
        f.debug_tuple("TypeDesc").field(&kind).finish()
    }
}

/// A command or event as the schema lists it.
pub(crate) enum Declared<'a> {
    Command {
        name: &'a str,
        arg: TypeDesc,
        ret: TypeDesc,
        allow_oob: bool,
        features: &'a [String],
    },
    Event {
        name: &'a str,
        arg: TypeDesc,
        features: &'a [String],
    },
}

/// The finished schema: its entries and their serialized list.
pub(crate) struct Compiled {
    pub(crate) entries: Vec<SchemaInfo>,
    /// The entries as JSON text, shared by every reply.
    pub(crate) json: bytes::Bytes,
}

/// The six builtins, always listed, as QEMU lists them.
const BUILTINS: [(&str, JsonType); 6] = [
    ("str", JsonType::String),
    ("any", JsonType::Value),
    ("bool", JsonType::Boolean),
    ("int", JsonType::Int),
    ("null", JsonType::Null),
    ("number", JsonType::Number),
];

/// Builds the schema of these commands and events, in their order, then the types they use.
pub(crate) fn build<'a>(declared: impl IntoIterator<Item = Declared<'a>>) -> Compiled {
    let mut compiler = Compiler::new();
    let mut entries = Vec::new();
    for item in declared {
        let entry = match item {
            Declared::Command {
                name,
                arg,
                ret,
                allow_oob,
                features,
            } => {
                let arg_type = compiler.top(arg);
                let ret_type = compiler.top(ret);
                SchemaInfo {
                    name: name.to_string(),
                    meta: MetaType::Command {
                        arg_type,
                        ret_type,
                        allow_oob: allow_oob.then_some(true),
                    },
                    features: features.to_vec(),
                }
            }
            Declared::Event {
                name,
                arg,
                features,
            } => SchemaInfo {
                name: name.to_string(),
                meta: MetaType::Event {
                    arg_type: compiler.top(arg),
                },
                features: features.to_vec(),
            },
        };
        entries.push(entry);
    }
    entries.extend(compiler.types);
    entries.extend(BUILTINS.iter().map(|&(name, json_type)| SchemaInfo {
        name: name.to_string(),
        meta: MetaType::Builtin { json_type },
        features: Vec::new(),
    }));
    let json = serde_json::to_vec(&entries).expect("a schema serializes");
    Compiled {
        entries,
        json: json.into(),
    }
}

impl Default for Compiled {
    fn default() -> Self {
        build([])
    }
}

/// The built-in commands' argument and return types, as the session decodes and encodes
/// them.
pub(crate) mod builtin_types {
    use schemars::JsonSchema;
    use serde_json::Value;

    /// `qmp_capabilities` arguments.
    #[derive(JsonSchema)]
    #[allow(dead_code)] // Described only: the session parses these arguments by hand.
    pub(crate) struct QmpCapabilitiesArguments {
        enable: Option<Vec<QmpCapability>>,
    }

    /// QEMU's `QMPCapability`, with this server's `async`.
    #[derive(JsonSchema)]
    #[serde(rename_all = "lowercase")]
    #[allow(dead_code)]
    pub(crate) enum QmpCapability {
        Oob,
        Async,
    }

    /// One `query-commands` row.
    #[derive(JsonSchema)]
    #[allow(dead_code)]
    pub(crate) struct CommandName {
        name: String,
    }

    /// One `query-async-commands` row.
    #[derive(JsonSchema)]
    #[serde(rename_all = "kebab-case")]
    #[allow(dead_code)]
    pub(crate) struct AsyncCommandInfo {
        command: String,
        elapsed_ms: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<Value>,
        oob: bool,
        status: crate::job::JobStatus,
        #[serde(skip_serializing_if = "Option::is_none")]
        current_progress: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        total_progress: Option<u64>,
    }

    /// The argument of `job-pause`, `job-resume`, `job-cancel`, `job-complete`,
    /// `job-finalize` and `job-dismiss`.
    #[derive(JsonSchema)]
    #[allow(dead_code)]
    pub(crate) struct JobIdArguments {
        id: String,
    }

    /// `JOB_STATUS_CHANGE` data.
    #[derive(JsonSchema)]
    #[allow(dead_code)]
    pub(crate) struct JobStatusChange {
        id: String,
        status: crate::job::JobStatus,
    }

    /// `async-command-cancel` arguments.
    #[derive(JsonSchema)]
    #[allow(dead_code)]
    pub(crate) struct AsyncCommandCancelArguments {
        id: Value,
    }
}

/// Which generator a schema came from: its `$ref`s point into that generator's definitions.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Side {
    Decoded = 0,
    Encoded = 1,
}

struct Compiler {
    generators: [SchemaGenerator; 2],
    /// Named definitions already resolved, per side.
    named: HashMap<(Side, String), String>,
    /// Definitions being resolved: a reference back to one is recursion.
    resolving: Vec<(Side, String)>,
    /// Interned entries by their description (name left out), so equal types share one.
    by_body: HashMap<String, String>,
    types: Vec<SchemaInfo>,
    next: u32,
}

impl Compiler {
    fn new() -> Self {
        let generator = |contract| {
            let mut settings = SchemaSettings::draft2020_12();
            settings.contract = contract;
            settings.into_generator()
        };
        Compiler {
            generators: [
                generator(Contract::Deserialize),
                generator(Contract::Serialize),
            ],
            named: HashMap::new(),
            resolving: Vec::new(),
            by_body: HashMap::new(),
            types: Vec::new(),
            next: 0,
        }
    }

    /// The type name of a command's arguments or return, or an event's data.
    fn top(&mut self, desc: TypeDesc) -> String {
        let (side, schema) = match desc.0 {
            Desc::Any => return "any".to_string(),
            Desc::Empty => return self.empty_object(),
            Desc::Decoded(f) => (Side::Decoded, f(&mut self.generators[0])),
            Desc::Encoded(f) => (Side::Encoded, f(&mut self.generators[1])),
        };
        let name = self.resolve(side, schema.as_value());
        if name == "null" {
            // `()`: answered as `{}`.
            return self.empty_object();
        }
        name
    }

    fn empty_object(&mut self) -> String {
        self.intern(MetaType::Object {
            members: Vec::new(),
            tag: None,
            variants: None,
        })
    }

    /// The QAPI type name of a JSON Schema, adding the entries it needs.
    fn resolve(&mut self, side: Side, schema: &Value) -> String {
        let Value::Object(map) = schema else {
            return "any".to_string(); // `true`: anything.
        };
        if let Some(reference) = map.get("$ref").and_then(Value::as_str) {
            return self.definition(side, reference);
        }
        if let Some(Value::Array(alternatives)) = map.get("oneOf").or_else(|| map.get("anyOf")) {
            return self.union(side, map, alternatives);
        }
        if let Some(Value::Array(all)) = map.get("allOf") {
            return match all.as_slice() {
                [only] => self.resolve(side, only),
                _ => "any".to_string(),
            };
        }
        if let Some(values) = enum_values(map) {
            return self.enumeration(values);
        }
        let types: Vec<&str> = match map.get("type") {
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
            _ => return "any".to_string(),
        };
        // Nullability (`Option<T>`) is optionality in QAPI: the member says it.
        let non_null: Vec<&str> = types.iter().copied().filter(|t| *t != "null").collect();
        match non_null.as_slice() {
            [] => "null".to_string(),
            ["string"] => "str".to_string(),
            ["integer"] => "int".to_string(),
            ["number"] => "number".to_string(),
            ["boolean"] => "bool".to_string(),
            ["array"] => {
                let element = match map.get("items") {
                    Some(items) => self.resolve(side, items),
                    None => "any".to_string(),
                };
                self.array(element)
            }
            ["object"] => self.object(side, map),
            _ => "any".to_string(),
        }
    }

    fn definition(&mut self, side: Side, reference: &str) -> String {
        let Some(def) = reference.strip_prefix("#/$defs/") else {
            return "any".to_string();
        };
        let key = (side, def.to_string());
        if let Some(name) = self.named.get(&key) {
            return name.clone();
        }
        if self.resolving.contains(&key) {
            return "any".to_string();
        }
        let Some(body) = self.generators[side as usize]
            .definitions()
            .get(def)
            .cloned()
        else {
            return "any".to_string();
        };
        self.resolving.push(key.clone());
        let name = self.resolve(side, &body);
        self.resolving.pop();
        self.named.insert(key, name.clone());
        name
    }

    /// An object: members from `properties`, optional unless `required`; a map without
    /// declared members is `any`.
    fn object(&mut self, side: Side, map: &serde_json::Map<String, Value>) -> String {
        let members = match self.members(side, map, None) {
            Some(members) => members,
            None => return "any".to_string(),
        };
        self.intern(MetaType::Object {
            members,
            tag: None,
            variants: None,
        })
    }

    /// The members of an object schema, leaving out `skip`; `None` for a free-form map.
    fn members(
        &mut self,
        side: Side,
        map: &serde_json::Map<String, Value>,
        skip: Option<&str>,
    ) -> Option<Vec<ObjectMember>> {
        let properties = match map.get("properties") {
            Some(Value::Object(properties)) => properties.clone(),
            _ => {
                let free = map
                    .get("additionalProperties")
                    .is_some_and(|extra| *extra != Value::Bool(false));
                if free {
                    return None;
                }
                serde_json::Map::new()
            }
        };
        let required: Vec<&str> = match map.get("required") {
            Some(Value::Array(names)) => names.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        // Name order: serde_json's map is sorted, and JSON Schema keeps no field order.
        let sorted: BTreeMap<String, Value> = properties.into_iter().collect();
        let mut members = Vec::new();
        for (name, property) in sorted {
            if Some(name.as_str()) == skip {
                continue;
            }
            let nullable = is_nullable(&property);
            let optional = nullable || !required.contains(&name.as_str());
            let type_ = self.resolve(side, &property);
            let deprecated = property.get("deprecated") == Some(&Value::Bool(true));
            members.push(ObjectMember {
                name,
                default: optional.then_some(()),
                type_,
                features: if deprecated {
                    vec!["deprecated".to_string()]
                } else {
                    Vec::new()
                },
            });
        }
        Some(members)
    }

    /// `oneOf`/`anyOf`: an enum if every alternative is a string constant, a flat union if
    /// every alternative is an object with one common constant member (serde's `tag`), an
    /// alternate if the alternatives have distinct JSON kinds, else `any`.
    fn union(
        &mut self,
        side: Side,
        base: &serde_json::Map<String, Value>,
        alternatives: &[Value],
    ) -> String {
        // Originals are resolved (their `$ref`s guard against recursion); inlined copies
        // are only looked into.
        let (originals, resolved): (Vec<&Value>, Vec<Value>) = alternatives
            .iter()
            .map(|alt| (alt, self.inline(side, alt)))
            .filter(|(_, alt)| !is_only_null(alt))
            .unzip();
        if resolved.len() == 1 && !base.contains_key("properties") {
            return self.resolve(side, originals[0]);
        }
        let constants: Option<Vec<String>> =
            resolved.iter().try_fold(Vec::new(), |mut all, alt| {
                let map = alt.as_object()?;
                all.extend(enum_values(map)?);
                Some(all)
            });
        if let Some(values) = constants {
            return self.enumeration(values);
        }
        if let Some(tag) = common_tag(&resolved) {
            return self.flat_union(side, base, &resolved, &tag);
        }
        let mut members: Vec<AlternateMember> = Vec::new();
        let mut kinds: Vec<&'static str> = Vec::new();
        for alt in originals {
            let type_ = self.resolve(side, alt);
            let kind = self.json_kind(&type_);
            if kind == "any" || kinds.contains(&kind) {
                return "any".to_string();
            }
            kinds.push(kind);
            members.push(AlternateMember { type_ });
        }
        self.intern(MetaType::Alternate { members })
    }

    fn flat_union(
        &mut self,
        side: Side,
        base: &serde_json::Map<String, Value>,
        alternatives: &[Value],
        tag: &str,
    ) -> String {
        let mut members = self.members(side, base, None).unwrap_or_default();
        let mut cases = Vec::new();
        let mut variants = Vec::new();
        for alt in alternatives {
            let map = alt.as_object().expect("common_tag checked objects");
            let case = enum_values(map["properties"][tag].as_object().expect("checked"))
                .and_then(|v| v.into_iter().next())
                .expect("checked");
            let extra = self.members(side, map, Some(tag)).unwrap_or_default();
            let type_ = self.intern(MetaType::Object {
                members: extra,
                tag: None,
                variants: None,
            });
            cases.push(case.clone());
            variants.push(Variant { case, type_ });
        }
        let tag_type = self.enumeration(cases);
        members.push(ObjectMember {
            name: tag.to_string(),
            default: None,
            type_: tag_type,
            features: Vec::new(),
        });
        members.sort_by(|a, b| a.name.cmp(&b.name));
        self.intern(MetaType::Object {
            members,
            tag: Some(tag.to_string()),
            variants: Some(variants),
        })
    }

    /// A `$ref` replaced by its definition, to look inside alternatives.
    fn inline(&self, side: Side, schema: &Value) -> Value {
        let mut schema = schema.clone();
        for _ in 0..8 {
            let Some(def) = schema
                .get("$ref")
                .and_then(Value::as_str)
                .and_then(|r| r.strip_prefix("#/$defs/"))
            else {
                break;
            };
            match self.generators[side as usize].definitions().get(def) {
                Some(body) => schema = body.clone(),
                None => break,
            }
        }
        schema
    }

    fn enumeration(&mut self, values: Vec<String>) -> String {
        self.intern(MetaType::Enum {
            members: values
                .iter()
                .map(|name| EnumMember {
                    name: name.clone(),
                    features: Vec::new(),
                })
                .collect(),
            values,
        })
    }

    fn array(&mut self, element: String) -> String {
        let name = format!("[{element}]");
        if !self.by_body.contains_key(&name) {
            self.by_body.insert(name.clone(), name.clone());
            self.types.push(SchemaInfo {
                name: name.clone(),
                meta: MetaType::Array {
                    element_type: element,
                },
                features: Vec::new(),
            });
        }
        name
    }

    /// The JSON kind a type name stands for, to check an alternate's members are distinct.
    fn json_kind(&self, name: &str) -> &'static str {
        match name {
            "str" => "string",
            "int" | "number" => "number",
            "bool" => "boolean",
            "null" => "null",
            "any" => "any",
            array if array.starts_with('[') => "array",
            other => match self.types.iter().find(|t| t.name == other).map(|t| &t.meta) {
                Some(MetaType::Enum { .. }) => "string",
                Some(MetaType::Object { .. }) => "object",
                _ => "any",
            },
        }
    }

    /// The name of an entry with this description: an existing equal one, or a new number.
    fn intern(&mut self, meta: MetaType) -> String {
        let body = serde_json::to_string(&meta).expect("a description serializes");
        if let Some(name) = self.by_body.get(&body) {
            return name.clone();
        }
        let name = self.next.to_string();
        self.next += 1;
        self.by_body.insert(body, name.clone());
        self.types.push(SchemaInfo {
            name: name.clone(),
            meta,
            features: Vec::new(),
        });
        name
    }
}

/// The string values of an `enum` or `const` schema.
fn enum_values(map: &serde_json::Map<String, Value>) -> Option<Vec<String>> {
    if let Some(Value::String(value)) = map.get("const") {
        return Some(vec![value.clone()]);
    }
    match map.get("enum") {
        Some(Value::Array(values)) => values
            .iter()
            .filter(|v| !v.is_null())
            .map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => None,
    }
}

fn is_only_null(schema: &Value) -> bool {
    schema.get("type") == Some(&Value::String("null".into()))
        || schema.get("const") == Some(&Value::Null)
}

/// Whether a member's schema admits `null` (an `Option` as serde encodes it).
fn is_nullable(schema: &Value) -> bool {
    match schema.get("type") {
        Some(Value::Array(types)) => types.iter().any(|t| t == "null") && types.len() > 1,
        _ => match schema.get("anyOf").or_else(|| schema.get("oneOf")) {
            Some(Value::Array(alts)) => alts.len() > 1 && alts.iter().any(is_only_null),
            _ => false,
        },
    }
}

/// The member every alternative has as a required string constant: serde's `tag`.
fn common_tag(alternatives: &[Value]) -> Option<String> {
    let first = alternatives.first()?.get("properties")?.as_object()?;
    first
        .iter()
        .filter(|(_, schema)| {
            schema
                .as_object()
                .and_then(enum_values)
                .is_some_and(|v| v.len() == 1)
        })
        .map(|(name, _)| name)
        .find(|name| {
            alternatives.iter().all(|alt| {
                let constant = alt
                    .get("properties")
                    .and_then(|p| p.get(name.as_str()))
                    .and_then(Value::as_object)
                    .and_then(enum_values)
                    .is_some_and(|v| v.len() == 1);
                let required = alt
                    .get("required")
                    .and_then(Value::as_array)
                    .is_some_and(|r| r.iter().any(|n| n == name.as_str()));
                constant && required
            })
        })
        .cloned()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{Command, NoArgs, Registry};

    #[derive(Deserialize, JsonSchema)]
    #[serde(rename_all = "kebab-case", deny_unknown_fields)]
    #[allow(dead_code)]
    struct Args {
        file_name: std::path::PathBuf,
        head: Option<u8>,
        #[serde(default)]
        format: Format,
        choice: Choice,
        map: std::collections::HashMap<String, u32>,
        list: Vec<i64>,
        job: Job,
    }

    #[derive(Deserialize, JsonSchema, Default)]
    #[serde(rename_all = "lowercase")]
    enum Format {
        #[default]
        Ppm,
        Png,
    }

    #[derive(Deserialize, JsonSchema)]
    #[serde(untagged)]
    #[allow(dead_code)]
    enum Choice {
        Name(String),
        Job(Job),
    }

    #[derive(Deserialize, JsonSchema)]
    #[serde(tag = "type", rename_all = "kebab-case")]
    #[allow(dead_code)]
    enum Job {
        Mirror { target: String },
        Commit {},
    }

    fn by_name<'a>(schema: &'a [SchemaInfo], name: &str) -> &'a SchemaInfo {
        schema
            .iter()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("no {name}"))
    }

    fn members(schema: &[SchemaInfo], name: &str) -> Value {
        serde_json::to_value(by_name(schema, name)).unwrap()
    }

    #[test]
    fn serde_attributes_map_to_qapi() {
        let registry = Registry::bare_builder()
            .with(Command::sync("x", |_: Args, _| Ok(())))
            .unwrap()
            .build();
        let schema = registry.schema();
        let MetaType::Command {
            arg_type, ret_type, ..
        } = &by_name(schema, "x").meta
        else {
            panic!()
        };
        assert_eq!(
            members(schema, ret_type),
            json!({"name": ret_type, "meta-type": "object", "members": []})
        );
        let args = members(schema, arg_type);
        let member = |n: &str| {
            args["members"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["name"] == n)
                .cloned()
                .unwrap()
        };
        assert_eq!(
            member("file-name"),
            json!({"name": "file-name", "type": "str"})
        );
        assert_eq!(
            member("head"),
            json!({"name": "head", "default": null, "type": "int"})
        );
        assert_eq!(member("map")["type"], "any");
        assert_eq!(member("list")["type"], "[int]");
        let format = members(schema, member("format")["type"].as_str().unwrap());
        assert_eq!(member("format")["default"], Value::Null);
        assert_eq!(format["values"], json!(["ppm", "png"]));
        let job = members(schema, member("job")["type"].as_str().unwrap());
        assert_eq!(job["tag"], "type");
        let cases: Vec<&str> = job["variants"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["case"].as_str().unwrap())
            .collect();
        assert_eq!(cases, ["mirror", "commit"]);
        let mirror = members(schema, job["variants"][0]["type"].as_str().unwrap());
        assert_eq!(
            mirror["members"],
            json!([{"name": "target", "type": "str"}])
        );
        let choice = members(schema, member("choice")["type"].as_str().unwrap());
        assert_eq!(choice["meta-type"], "alternate");
        assert_eq!(choice["members"][0], json!({"type": "str"}));
        assert_eq!(choice["members"][1]["type"], member("job")["type"]);
    }

    #[test]
    fn builtins_describe_themselves() {
        let registry = Registry::builder()
            .with(Command::sync("n", |_: NoArgs, _| Ok(())))
            .unwrap()
            .build();
        let text = std::str::from_utf8(registry.schema_bytes()).unwrap();
        eprintln!(
            "{} entries, {} bytes: {text}",
            registry.schema().len(),
            text.len()
        );
        let schema = registry.schema();
        let MetaType::Command {
            arg_type, ret_type, ..
        } = &by_name(schema, "n").meta
        else {
            panic!()
        };
        assert_eq!(arg_type, ret_type, "NoArgs and () are the one empty object");
        let MetaType::Command { ret_type, .. } = &by_name(schema, "query-qmp-schema").meta else {
            panic!()
        };
        let info = members(
            schema,
            ret_type.trim_start_matches('[').trim_end_matches(']'),
        );
        assert_eq!(info["tag"], "meta-type");
        assert_eq!(info["variants"].as_array().unwrap().len(), 7);
    }
}
