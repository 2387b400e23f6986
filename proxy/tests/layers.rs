//! The proxy's layers point one way. `docs/architecture.md`'s table "The layers of the
//! proxy" lists them from the top down with the files of each; this test places every
//! file of `proxy/src` in its layer and fails on a file the table does not place and on
//! any `crate::` path (in a `use` or inline, outside comments) that reaches a layer
//! above the file's own.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// The table: each layer's name and the paths its row names (`relay/`, `actions.rs`).
fn layers() -> Vec<(String, Vec<String>)> {
    let doc = std::fs::read_to_string(root().join("../docs/architecture.md")).unwrap();
    let section = doc
        .split("## The layers of the proxy")
        .nth(1)
        .expect("docs/architecture.md has the section \"The layers of the proxy\"");
    let mut out = Vec::new();
    for line in section.lines().skip_while(|l| !l.starts_with('|')) {
        if !line.starts_with('|') {
            break;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let (name, paths) = (cells[1], cells[2]);
        if name == "layer" || name.starts_with("---") {
            continue;
        }
        let paths: Vec<String> = paths
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect();
        assert!(!paths.is_empty(), "the layer {name} names no file");
        out.push((name.to_string(), paths));
    }
    assert!(
        out.len() >= 8,
        "the table has {} layers: {out:?}",
        out.len()
    );
    out
}

/// Every `.rs` file under `dir`, as a path relative to `proxy/src`.
fn sources(dir: &Path, base: &Path, out: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, base, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p.strip_prefix(base).unwrap().to_string_lossy().into_owned());
        }
    }
}

/// The index of the layer a file of `proxy/src` belongs to: a row names the file, its
/// directory (`relay/`), or the module file a directory belongs to (`util.rs` for
/// `util/tests.rs`).
fn layer_of(file: &str, layers: &[(String, Vec<String>)]) -> Option<usize> {
    let top = file.split('/').next().unwrap();
    layers.iter().position(|(_, paths)| {
        paths.iter().any(|p| {
            p == file
                || p.strip_suffix('/').is_some_and(|d| d == top)
                || p.strip_suffix(".rs").is_some_and(|m| m == top && file != p)
        })
    })
}

/// The module a `crate::NAME` path reaches, as a file name the table uses.
fn module_file(name: &str, src: &Path) -> Option<String> {
    if src.join(format!("{name}.rs")).is_file() {
        Some(format!("{name}.rs"))
    } else if src.join(name).is_dir() {
        Some(format!("{name}/mod.rs"))
    } else {
        None
    }
}

/// The code of a file without its comments (line, doc and block comments) and with
/// its string and char literals emptied, so that a path named in prose or in a
/// message is not an import. Line breaks are kept, so line numbers hold.
fn code(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let newlines = |s: &str| "\n".repeat(s.matches('\n').count());
    while i < b.len() {
        let rest = &text[i..];
        if rest.starts_with("//") {
            let end = rest.find('\n').unwrap_or(rest.len());
            i += end;
        } else if rest.starts_with("/*") {
            let end = rest.find("*/").map(|e| e + 2).unwrap_or(rest.len());
            out.push_str(&newlines(&rest[..end]));
            i += end;
        } else if let Some(hashes) = rest
            .strip_prefix('r')
            .map(|r| r.len() - r.trim_start_matches('#').len())
            .filter(|h| rest[1 + h..].starts_with('"'))
        {
            // A raw string: r"...", r#"..."#.
            let close = format!("\"{}", "#".repeat(hashes));
            let body = 2 + hashes;
            let end = rest[body..]
                .find(&close)
                .map(|e| body + e + close.len())
                .unwrap_or(rest.len());
            out.push_str("\"\"");
            out.push_str(&newlines(&rest[..end]));
            i += end;
        } else if rest.starts_with('"') {
            let mut j = 1;
            while j < rest.len() {
                match rest.as_bytes()[j] {
                    b'\\' => j += 2,
                    b'"' => break,
                    _ => j += 1,
                }
            }
            let end = (j + 1).min(rest.len());
            out.push_str("\"\"");
            out.push_str(&newlines(&rest[..end]));
            i += end;
        } else if let Some(after) = rest.strip_prefix('\'') {
            // A char literal ('x', '\n', '"'), or a lifetime ('a): only the former
            // closes within a few characters.
            let lit = if let Some(escaped) = after.strip_prefix('\\') {
                escaped.find('\'').map(|e| e + 3)
            } else {
                after
                    .char_indices()
                    .nth(1)
                    .filter(|(_, c)| *c == '\'')
                    .map(|(e, _)| e + 2)
            };
            match lit {
                Some(end) => {
                    out.push_str("' '");
                    i += end;
                }
                None => {
                    out.push('\'');
                    i += 1;
                }
            }
        } else {
            let c = rest.chars().next().unwrap();
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// Every module a file's code reaches through `crate::`, with its line.
fn crate_paths(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (n, line) in code(text).lines().enumerate() {
        let mut rest = line;
        while let Some(i) = rest.find("crate::") {
            let before = rest[..i].chars().last();
            rest = &rest[i + "crate::".len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue; // `handoff_crate::`, say
            }
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.push((n + 1, name));
            }
        }
        // `use crate::{a, b::c}` reaches every name in the braces.
        if let Some(i) = line.find("use crate::{") {
            let inner = &line[i + "use crate::{".len()..];
            for part in inner.split([',', '}']) {
                let name: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.push((n + 1, name));
                }
            }
        }
    }
    out
}

/// The files of the binary (`main.rs` and its modules) use the library as `handoff::`;
/// their `crate::` is the binary's own.
fn binary_files() -> Vec<String> {
    let main = std::fs::read_to_string(root().join("src/main.rs")).unwrap();
    let mut files = vec!["main.rs".to_string()];
    for line in main.lines() {
        if let Some(m) = line.trim().strip_prefix("mod ") {
            files.push(format!("{}.rs", m.trim_end_matches(';')));
        }
    }
    files
}

/// Every path of the library that points up the table, as messages.
fn upward_paths(layers: &[(String, Vec<String>)]) -> Vec<String> {
    let src = root().join("src");
    let mut files = Vec::new();
    sources(&src, &src, &mut files);
    files.sort();
    let binary = binary_files();
    let mut problems = Vec::new();
    for file in &files {
        let Some(own) = layer_of(file, layers) else {
            problems.push(format!(
                "{file} is in no layer of docs/architecture.md's table"
            ));
            continue;
        };
        if binary.contains(file) {
            continue;
        }
        let text = std::fs::read_to_string(src.join(file)).unwrap();
        for (line, name) in crate_paths(&text) {
            let Some(target) = module_file(&name, &src) else {
                continue; // an item of lib.rs: the wiring, which nothing below names
            };
            let Some(theirs) = layer_of(&target, layers) else {
                continue; // reported as a file in no layer
            };
            if theirs < own {
                problems.push(format!(
                    "{file}:{line}: crate::{name} is in the layer \"{}\", above \"{}\"",
                    layers[theirs].0, layers[own].0
                ));
            }
        }
    }
    problems
}

#[test]
fn no_module_imports_a_layer_above_its_own() {
    let layers = layers();
    let problems = upward_paths(&layers);
    assert!(
        problems.is_empty(),
        "imports that point up docs/architecture.md's layers:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_check_sees_what_it_must() {
    let layers = layers();
    let by_name: BTreeMap<&str, usize> = layers
        .iter()
        .enumerate()
        .map(|(i, (n, _))| (n.as_str(), i))
        .collect();
    // The table places files by directory and by module file.
    assert_eq!(
        layer_of("relay/txn/run.rs", &layers),
        Some(by_name["relay"])
    );
    let module_file = [("ground".to_string(), vec!["util.rs".to_string()])];
    assert_eq!(layer_of("util/tests.rs", &module_file), Some(0));
    assert_eq!(layer_of("utils.rs", &module_file), None);
    assert!(by_name["frontend"] < by_name["relay"], "{layers:?}");
    // Paths are found in uses, braces and inline, not in comments or strings.
    let text = "use crate::relay::Txn;\nuse crate::{net, shard::Ctx};\n// crate::admin\nlet s = \"crate::console\";\nlet q = '\"'; let r = r#\"crate::cli \"quoted\"\"#;\nfn f<'a>(x: &'a str) {}\nx(crate::frontend::f());\n";
    let names: Vec<String> = crate_paths(text).into_iter().map(|(_, n)| n).collect();
    assert_eq!(names, ["relay", "net", "shard", "frontend"]);
}
