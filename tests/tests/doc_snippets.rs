//! Every Rust snippet in README.md and docs/*.md is compiled by `cargo test`: each file with
//! Rust code blocks is included with `#[doc = include_str!(..)]` by a crate (so rustdoc
//! compiles its blocks as doctests), and no block is `ignore`d.
//!
//! "Rust code block" follows rustdoc's rule, not the author's intent: a fence with no info
//! string is Rust too. A file may be rendered without doctests
//! (`#[cfg_attr(not(doctest), doc = include_str!(..))]`) only while its unlabelled fences
//! hold something else (JSON transcripts) and it has no block labelled `rust`.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

/// The crates whose sources may include the docs.
const SOURCE_DIRS: [&str; 3] = ["dispatcher/src", "qga-compat/src", "handlers/src"];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("qmp-tests sits in the workspace")
        .to_path_buf()
}

/// A fenced code block's info string and the line it starts on.
#[derive(Debug)]
struct Block {
    line: usize,
    info: String,
}

/// The fenced code blocks of a markdown text (``` and ~~~ fences, CommonMark's closing rule).
fn code_blocks(markdown: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut open: Option<(char, usize)> = None;
    for (index, line) in markdown.lines().enumerate() {
        let trimmed = line.trim_start();
        let Some(fence_char) = trimmed.chars().next().filter(|c| *c == '`' || *c == '~') else {
            continue;
        };
        let length = trimmed.chars().take_while(|c| *c == fence_char).count();
        if length < 3 {
            continue;
        }
        let rest = trimmed[length..].trim();
        match open {
            None => {
                open = Some((fence_char, length));
                blocks.push(Block {
                    line: index + 1,
                    info: rest.to_string(),
                });
            }
            Some((c, n)) if c == fence_char && length >= n && rest.is_empty() => open = None,
            Some(_) => {}
        }
    }
    assert!(open.is_none(), "an unclosed code fence");
    blocks
}

fn tokens(info: &str) -> Vec<&str> {
    info.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|t| !t.is_empty())
        .collect()
}

/// rustdoc's rule: a block is Rust when it says `rust`, or when every word of its info
/// string is one of rustdoc's own attributes (an empty info string included).
fn is_rust(info: &str) -> bool {
    let attribute = |t: &str| {
        matches!(
            t,
            "ignore" | "no_run" | "should_panic" | "compile_fail" | "test_harness"
        ) || t.starts_with("edition")
            || t.starts_with("ignore-")
            || t == "standalone_crate"
    };
    let words = tokens(info);
    words.contains(&"rust") || words.iter().all(|t| attribute(t))
}

fn is_ignored(info: &str) -> bool {
    tokens(info)
        .iter()
        .any(|t| *t == "ignore" || t.starts_with("ignore-"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inclusion {
    /// `#[doc = include_str!(..)]`: rendered and doctested.
    Doctested,
    /// `#[cfg_attr(not(doctest), doc = include_str!(..))]`: rendered only.
    RenderedOnly,
}

/// Every markdown file a crate includes as documentation, by canonical path.
fn inclusions() -> HashMap<PathBuf, Vec<(PathBuf, Inclusion)>> {
    let mut found: HashMap<PathBuf, Vec<(PathBuf, Inclusion)>> = HashMap::new();
    let mut stack: Vec<PathBuf> = SOURCE_DIRS.iter().map(|d| workspace().join(d)).collect();
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let source = fs::read_to_string(&path).expect("source file");
            for line in source.lines().map(str::trim) {
                let Some(start) = line.find("include_str!(\"") else {
                    continue;
                };
                let kind = if line.starts_with("#[doc = include_str!(\"") {
                    Inclusion::Doctested
                } else if line.starts_with("#[cfg_attr(not(doctest), doc = include_str!(\"") {
                    Inclusion::RenderedOnly
                } else {
                    continue;
                };
                let tail = &line[start + "include_str!(\"".len()..];
                let relative = &tail[..tail.find('"').expect("closing quote")];
                let target = path.parent().expect("source dir").join(relative);
                let target = target
                    .canonicalize()
                    .unwrap_or_else(|e| panic!("{}: {}: {e}", path.display(), relative));
                found.entry(target).or_default().push((path.clone(), kind));
            }
        }
    }
    found
}

fn markdown_files() -> Vec<PathBuf> {
    let mut files = vec![workspace().join("README.md")];
    for entry in fs::read_dir(workspace().join("docs")).expect("docs/") {
        let path = entry.expect("directory entry").path();
        if path.extension().is_some_and(|e| e == "md") {
            files.push(path);
        }
    }
    files.sort();
    files
}

#[test]
fn every_rust_snippet_in_the_docs_is_compiled() {
    let inclusions = inclusions();
    let mut problems = Vec::new();
    let mut compiled_files = 0;
    for file in markdown_files() {
        let name = file
            .strip_prefix(workspace())
            .unwrap()
            .display()
            .to_string();
        let text = fs::read_to_string(&file).expect("markdown file");
        let rust: Vec<Block> = code_blocks(&text)
            .into_iter()
            .filter(|b| is_rust(&b.info))
            .collect();
        for block in rust.iter().filter(|b| is_ignored(&b.info)) {
            problems.push(format!(
                "{name}:{}: `{}` is not compiled; make it build",
                block.line, block.info
            ));
        }
        let canonical = file.canonicalize().expect("markdown path");
        let kinds: Vec<Inclusion> = inclusions
            .get(&canonical)
            .map(|v| v.iter().map(|(_, k)| *k).collect())
            .unwrap_or_default();
        let doctested = kinds.contains(&Inclusion::Doctested);
        if kinds.contains(&Inclusion::RenderedOnly) && !doctested {
            let labelled: Vec<&Block> = rust.iter().filter(|b| !b.info.is_empty()).collect();
            if let Some(block) = labelled.first() {
                problems.push(format!(
                    "{name}:{}: a Rust block in a file included without doctests; include it \
                     with #[doc = include_str!(..)]",
                    block.line
                ));
            } else if rust.is_empty() {
                problems.push(format!(
                    "{name}: has no unlabelled fences any more; include it with \
                     #[doc = include_str!(..)] so future snippets are compiled"
                ));
            }
            continue;
        }
        if rust.is_empty() {
            continue;
        }
        if doctested {
            compiled_files += 1;
        } else {
            problems.push(format!(
                "{name}:{}: Rust blocks in a file no crate includes with \
                 #[doc = include_str!(..)]; they are never compiled",
                rust[0].line
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // README.md, docs/embedding.md and docs/qga.md have Rust snippets today.
    assert!(
        compiled_files >= 3,
        "only {compiled_files} files with snippets"
    );
}

#[test]
fn rust_blocks_are_recognised_as_rustdoc_does() {
    let text = "```\nbare\n```\n\n```text\nt\n```\n````rust,no_run\n```\n````\n\
                ~~~sh\n~~~\n```rust,ignore\n```\n```edition2021\n```\n```toml\n```\n";
    let blocks = code_blocks(text);
    let infos: Vec<&str> = blocks.iter().map(|b| b.info.as_str()).collect();
    assert_eq!(
        infos,
        [
            "",
            "text",
            "rust,no_run",
            "sh",
            "rust,ignore",
            "edition2021",
            "toml"
        ]
    );
    let rust: Vec<bool> = infos.iter().map(|i| is_rust(i)).collect();
    assert_eq!(rust, [true, false, true, false, true, true, false]);
    assert!(is_ignored("rust,ignore") && is_ignored("ignore-x86_64") && !is_ignored("no_run"));
}
