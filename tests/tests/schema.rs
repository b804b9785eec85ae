//! `query-qmp-schema` of the demo, over a real Unix socket: a valid instance of QEMU's own
//! `SchemaInfo` (as qemu-storage-daemon 10.0.2's recorded schema describes it), consistent
//! with `query-commands`, closed under type references, answering libvirt-style path
//! queries, and in agreement with the argument decoder.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use qmp_handlers::demo::{self, DemoOptions};
use qmp_tests::{Client, Holds, Scratch, TestServer};
use serde_json::{Map, Value, json};

/// Entries by name.
type Schema = HashMap<String, Value>;

fn by_name(entries: &[Value]) -> Schema {
    entries
        .iter()
        .map(|e| (e["name"].as_str().expect("name").to_string(), e.clone()))
        .collect()
}

/// qemu-storage-daemon 10.0.2's recorded schema.
fn qemu_schema() -> Schema {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/data/qemu-10.0-schema/qemu-storage-daemon-10.0.2-query-qmp-schema.json"
    );
    let text = std::fs::read_to_string(path).expect("recorded schema");
    let entries: Vec<Value> = serde_json::from_str(&text).expect("JSON");
    by_name(&entries)
}

/// Checks `value` against type `name` of `schema`; the error says where it failed.
fn check(schema: &Schema, name: &str, value: &Value, at: &str) -> Result<(), String> {
    let entry = schema
        .get(name)
        .ok_or_else(|| format!("{at}: type {name} not in the schema"))?;
    let fail = |what: &str| Err(format!("{at}: {what}, got {value}"));
    match entry["meta-type"].as_str() {
        Some("builtin") => {
            let ok = match entry["json-type"].as_str() {
                Some("string") => value.is_string(),
                Some("int") => value.is_i64() || value.is_u64(),
                Some("number") => value.is_number(),
                Some("boolean") => value.is_boolean(),
                Some("null") => value.is_null(),
                Some("value") => true,
                other => return Err(format!("{at}: unknown json-type {other:?}")),
            };
            if ok { Ok(()) } else { fail(name) }
        }
        Some("enum") => {
            let values: Vec<&Value> = entry["members"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| &m["name"])
                .collect();
            if values.contains(&value) {
                Ok(())
            } else {
                fail("not a value of the enum")
            }
        }
        Some("array") => {
            let Some(items) = value.as_array() else {
                return fail("not an array");
            };
            let element = entry["element-type"].as_str().unwrap();
            for (i, item) in items.iter().enumerate() {
                check(schema, element, item, &format!("{at}[{i}]"))?;
            }
            Ok(())
        }
        Some("alternate") => {
            let any = entry["members"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| check(schema, m["type"].as_str().unwrap(), value, at).is_ok());
            if any {
                Ok(())
            } else {
                fail("no alternative matches")
            }
        }
        Some("object") => {
            let Some(object) = value.as_object() else {
                return fail("not an object");
            };
            let mut members: Vec<Value> = entry["members"].as_array().unwrap().clone();
            if let Some(tag) = entry["tag"].as_str() {
                let case = &object.get(tag).ok_or(format!("{at}: no tag {tag}"))?;
                let variant = entry["variants"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|v| &v["case"] == *case)
                    .ok_or(format!("{at}: no variant {case}"))?;
                let variant_type = &schema[variant["type"].as_str().unwrap()];
                members.extend(variant_type["members"].as_array().unwrap().iter().cloned());
            }
            let declared: HashSet<&str> = members
                .iter()
                .map(|m| m["name"].as_str().unwrap())
                .collect();
            if let Some(extra) = object.keys().find(|k| !declared.contains(k.as_str())) {
                return Err(format!("{at}: member {extra} is not declared"));
            }
            for member in &members {
                let member_name = member["name"].as_str().unwrap();
                match object.get(member_name) {
                    Some(v) => check(
                        schema,
                        member["type"].as_str().unwrap(),
                        v,
                        &format!("{at}.{member_name}"),
                    )?,
                    None if member.get("default").is_some() => {}
                    None => return Err(format!("{at}: mandatory {member_name} missing")),
                }
            }
            Ok(())
        }
        other => Err(format!("{at}: meta-type {other:?} is not a type")),
    }
}

/// QEMU's `SchemaInfo` type: the element of `query-qmp-schema`'s return type.
fn schema_info_type(schema: &Schema) -> String {
    let ret = schema["query-qmp-schema"]["ret-type"].as_str().unwrap();
    schema[ret]["element-type"].as_str().unwrap().to_string()
}

/// libvirt's `virQEMUQAPISchemaPathExists`: `command/arg-type/member/...`, where a component
/// may be `+case` (a union variant), `*member` (an optional member), `^value` (an enum
/// value), `!json-type` (a builtin's JSON type) or `$feature` (a feature of the entry
/// reached so far).
fn path_exists(schema: &Schema, query: &str) -> bool {
    let mut parts = query.split('/');
    let Some(first) = parts.next() else {
        return false;
    };
    let Some(entry) = schema.get(first) else {
        return false;
    };
    let rest: Vec<&str> = parts.collect();
    traverse(schema, entry, &rest)
}

fn traverse(schema: &Schema, entry: &Value, query: &[&str]) -> bool {
    let Some((&part, rest)) = query.split_first() else {
        return true;
    };
    if let Some(feature) = part.strip_prefix('$') {
        let has = entry["features"]
            .as_array()
            .is_some_and(|f| f.iter().any(|x| x == feature));
        return has && rest.is_empty();
    }
    let next = |type_name: &str, rest: &[&str]| {
        schema
            .get(type_name)
            .is_some_and(|t| traverse(schema, t, rest))
    };
    match entry["meta-type"].as_str() {
        Some("command") | Some("event") => match entry.get(part).and_then(Value::as_str) {
            Some(type_name) if part == "arg-type" || part == "ret-type" => next(type_name, rest),
            _ => false,
        },
        Some("array") => next(entry["element-type"].as_str().unwrap(), query),
        Some("alternate") => entry["members"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| next(m["type"].as_str().unwrap(), query)),
        Some("enum") => {
            let Some(value) = part.strip_prefix('^') else {
                return false;
            };
            rest.is_empty()
                && entry["members"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|m| m["name"] == value)
        }
        Some("builtin") => {
            let Some(json_type) = part.strip_prefix('!') else {
                return false;
            };
            rest.is_empty() && entry["json-type"] == json_type
        }
        Some("object") => {
            if part.starts_with('^') || part.starts_with('!') {
                return false;
            }
            let (list, key, name) = match part.strip_prefix('+') {
                Some(case) => ("variants", "case", case),
                None => ("members", "name", part.trim_start_matches('*')),
            };
            let Some(found) = entry[list]
                .as_array()
                .and_then(|items| items.iter().find(|i| i[key] == name))
            else {
                return false;
            };
            if part.starts_with('*') && found.get("default").is_none() {
                return false;
            }
            next(found["type"].as_str().unwrap(), rest)
        }
        _ => false,
    }
}

/// Every type name an entry refers to.
fn references(entry: &Value) -> Vec<String> {
    let mut names = Vec::new();
    for key in ["arg-type", "ret-type", "element-type"] {
        if let Some(name) = entry[key].as_str() {
            names.push(name.to_string());
        }
    }
    for list in ["members", "variants"] {
        for item in entry[list].as_array().into_iter().flatten() {
            if let Some(name) = item["type"].as_str() {
                names.push(name.to_string());
            }
        }
    }
    names
}

struct Demo {
    server: TestServer,
}

impl Demo {
    fn start() -> Self {
        let demo = demo::build(&DemoOptions::default(), || {}).expect("demo builds");
        Demo {
            server: TestServer::serve(demo.server, Holds::default()),
        }
    }

    async fn client(&self) -> Client {
        self.server.negotiated(&[]).await
    }
}

async fn call(client: &mut Client, command: &str, arguments: Value) -> Value {
    client.execute(command, arguments, json!("s")).await;
    client.recv_reply().await
}

async fn fetch_schema(client: &mut Client) -> Vec<Value> {
    let reply = call(client, "query-qmp-schema", json!({})).await;
    reply["return"]
        .as_array()
        .unwrap_or_else(|| panic!("no schema: {reply}"))
        .clone()
}

#[tokio::test]
async fn the_demo_schema_is_a_valid_qemu_schema_info_list() {
    let demo = Demo::start();
    let mut client = demo.client().await;
    let entries = fetch_schema(&mut client).await;
    let qemu = qemu_schema();
    let info = schema_info_type(&qemu);
    for (i, entry) in entries.iter().enumerate() {
        if let Err(e) = check(&qemu, &info, entry, &format!("[{i}]")) {
            panic!("entry {entry} is not a SchemaInfo: {e}");
        }
    }
    // The validator can fail: a member QEMU does not declare, a bad meta-type.
    let bad =
        json!({"name": "x", "meta-type": "command", "arg-type": "0", "ret-type": "0", "x": 1});
    assert!(check(&qemu, &info, &bad, "bad").is_err());
    let bad = json!({"name": "x", "meta-type": "struct", "members": []});
    assert!(check(&qemu, &info, &bad, "bad").is_err());

    // Masked names: numbers, arrays of names, the builtins; commands and events by name.
    let schema = by_name(&entries);
    for entry in &entries {
        let name = entry["name"].as_str().unwrap();
        match entry["meta-type"].as_str().unwrap() {
            "command" | "event" => {}
            "builtin" => assert!(["str", "any", "bool", "int", "null", "number"].contains(&name)),
            "array" => assert_eq!(
                name,
                format!("[{}]", entry["element-type"].as_str().unwrap())
            ),
            _ => assert!(name.parse::<u32>().is_ok(), "unmasked type name {name}"),
        }
    }
    assert_eq!(schema.len(), entries.len(), "names are unique");
}

#[tokio::test]
async fn commands_match_query_commands_and_every_reference_resolves() {
    let demo = Demo::start();
    let mut client = demo.client().await;
    let entries = fetch_schema(&mut client).await;
    let schema = by_name(&entries);
    let listed = call(&mut client, "query-commands", json!({})).await;
    let listed: HashSet<String> = listed["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    let in_schema: HashSet<String> = entries
        .iter()
        .filter(|e| e["meta-type"] == "command")
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, in_schema);
    for entry in &entries {
        for name in references(entry) {
            assert!(
                schema.contains_key(&name),
                "{entry} refers to missing {name}"
            );
        }
    }
    let events: HashSet<&str> = entries
        .iter()
        .filter(|e| e["meta-type"] == "event")
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        events,
        HashSet::from([
            "SHUTDOWN",
            "STOP",
            "RESUME",
            "POWERDOWN",
            "JOB_STATUS_CHANGE"
        ])
    );
    let empty = json!({"name": schema["STOP"]["arg-type"], "members": [], "meta-type": "object"});
    assert_eq!(schema[schema["STOP"]["arg-type"].as_str().unwrap()], empty);
    assert_eq!(schema["stop"]["ret-type"], schema["STOP"]["arg-type"]);
    assert_eq!(schema["query-yank"]["allow-oob"], true);
}

#[tokio::test]
async fn libvirt_style_path_queries() {
    let demo = Demo::start();
    let mut client = demo.client().await;
    let schema = by_name(&fetch_schema(&mut client).await);
    for query in [
        "screendump/arg-type/filename",
        "screendump/arg-type/device",
        "screendump/arg-type/*device",
        "screendump/arg-type/*format",
        "screendump/arg-type/head/!int",
        "screendump/arg-type/format/^png",
        "screendump/arg-type/format/^ppm",
        "query-status/ret-type/status/^paused",
        "query-status/ret-type/running/!boolean",
        "x-delay/arg-type/ms",
        "qmp_capabilities/arg-type/enable/^oob",
        "qmp_capabilities/arg-type/enable/^async",
        "SHUTDOWN/arg-type/reason/^host-qmp-quit",
        "query-yank/ret-type/+block-node/node-name",
        "query-qmp-schema/ret-type/+command/*allow-oob",
        // The dispatcher's features: out-of-order replies, declared events.
        "x-delay/$async",
        "screendump/$async",
        "stop/$emits-STOP",
        "quit/$emits-SHUTDOWN",
    ] {
        assert!(path_exists(&schema, query), "{query} should exist");
    }
    for query in [
        "screendump/arg-type/nope",
        "screendump/arg-type/*filename",
        "screendump/arg-type/format/^jpeg",
        "screendump/ret-type/filename",
        "query-status/ret-type/status/^nope",
        "query-status/ret-type/singlestep",
        "query-yank/ret-type/+nope",
        "no-such-command/arg-type",
        "SHUTDOWN/ret-type",
        "stop/$deprecated",
        "query-status/$async",
        "stop/$emits-RESUME",
        "query-async-commands/$async",
    ] {
        assert!(!path_exists(&schema, query), "{query} should not exist");
    }
}

/// A value of type `name`, built from the schema alone.
fn sample(schema: &Schema, name: &str, member: &str, scratch: &Scratch) -> Value {
    let entry = &schema[name];
    match entry["meta-type"].as_str().unwrap() {
        "builtin" => match name {
            "str" if member == "filename" => json!(scratch.path("dump").to_str().unwrap()),
            "str" => json!("x"),
            "int" | "number" => json!(0),
            "bool" => json!(false),
            "null" => Value::Null,
            _ => json!("x"),
        },
        "enum" => entry["members"][0]["name"].clone(),
        "array" => json!([]),
        "alternate" => sample(
            schema,
            entry["members"][0]["type"].as_str().unwrap(),
            member,
            scratch,
        ),
        "object" => {
            let mut object = Map::new();
            for m in entry["members"].as_array().unwrap() {
                if m.get("default").is_none() {
                    let name = m["name"].as_str().unwrap();
                    object.insert(
                        name.to_string(),
                        sample(schema, m["type"].as_str().unwrap(), name, scratch),
                    );
                }
            }
            if let Some(variants) = entry["variants"].as_array() {
                let first = &schema[variants[0]["type"].as_str().unwrap()];
                if let Value::Object(extra) =
                    sample(schema, first["name"].as_str().unwrap(), "", scratch)
                {
                    object.extend(extra);
                }
            }
            Value::Object(object)
        }
        other => panic!("{other} is not a type"),
    }
}

fn is_argument_error(reply: &Value) -> bool {
    let desc = reply["error"]["desc"].as_str().unwrap_or("");
    desc.starts_with("Parameter '") || desc.starts_with("Invalid parameter type")
}

#[tokio::test]
async fn arguments_built_from_the_schema_are_accepted_and_undeclared_ones_rejected() {
    let demo = Demo::start();
    let scratch = Scratch::new();
    let mut client = demo.client().await;
    let entries = fetch_schema(&mut client).await;
    let schema = by_name(&entries);
    let mut commands: Vec<&str> = entries
        .iter()
        .filter(|e| e["meta-type"] == "command")
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    // quit last: it shuts the VM down.
    commands.sort_by_key(|c| *c == "quit");
    assert_eq!(commands.last(), Some(&"quit"));
    for command in commands {
        let arg_type = schema[command]["arg-type"].as_str().unwrap();
        assert_ne!(arg_type, "any", "{command} has undescribed arguments");
        let arguments = sample(&schema, arg_type, "", &scratch);
        if command != "qmp_capabilities" {
            // Negotiation is over: qmp_capabilities answers that before it reads arguments.
            let mut extra = arguments.clone();
            extra["x-undeclared"] = json!(1);
            let reply = call(&mut client, command, extra).await;
            assert_eq!(
                reply["error"]["desc"], "Parameter 'x-undeclared' is unexpected",
                "{command}: {reply}"
            );
        }
        let reply = call(&mut client, command, arguments.clone()).await;
        assert!(!is_argument_error(&reply), "{command} {arguments}: {reply}");
        if reply.get("return").is_some() {
            let ret_type = schema[command]["ret-type"].as_str().unwrap();
            if let Err(e) = check(&schema, ret_type, &reply["return"], command) {
                panic!("{command}'s reply does not match its ret-type: {e}");
            }
        }
    }
}

#[tokio::test]
async fn schema_size_and_cost() {
    let demo = Demo::start();
    let entries = demo.server.server.registry().schema().len();
    let mut client = demo.client().await;
    let wire = fetch_schema(&mut client).await;
    assert_eq!(wire.len(), entries);
    let bytes = serde_json::to_string(&wire).unwrap().len();
    const ROUNDS: u32 = 200;
    let started = Instant::now();
    for _ in 0..ROUNDS {
        client
            .execute("query-qmp-schema", json!({}), json!(1))
            .await;
        client.recv_line().await;
    }
    let per_call = started.elapsed() / ROUNDS;
    let in_process = {
        let registry = demo.server.server.registry();
        let started = Instant::now();
        for _ in 0..ROUNDS {
            std::hint::black_box(serde_json::to_string(registry.schema()).unwrap());
        }
        started.elapsed() / ROUNDS
    };
    eprintln!(
        "demo schema: {entries} entries, {bytes} bytes; one query-qmp-schema round trip \
         {per_call:?} (the reply is precomputed; re-serializing it would cost {in_process:?})"
    );
}
