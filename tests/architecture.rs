//! The module floors written at the top of `src/lib.rs` hold: every module uses only
//! modules on lower floors (so there is no import cycle), and every module has a floor.
//! The README cites, as the attacks on each guarantee, only tests that exist.
//! No source file is over 700 lines.

use std::collections::BTreeMap;
use std::path::Path;

fn floors() -> BTreeMap<String, usize> {
    let lib = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs"))
        .expect("src/lib.rs");
    let mut out = BTreeMap::new();
    for line in lib.lines() {
        let Some(rest) = line.strip_prefix("// floor ") else {
            continue;
        };
        let (n, names) = rest.split_once(':').expect("`// floor N: modules`");
        let n: usize = n.trim().parse().expect("a floor number");
        for m in names.split_whitespace() {
            assert!(out.insert(m.to_owned(), n).is_none(), "{m} has two floors");
        }
    }
    assert!(out.len() > 10, "the floors list is missing from src/lib.rs");
    out
}

/// The crate's modules (`src/x.rs` or `src/x/…`), and the `crate::y` paths each uses
/// outside its unit tests. Intra-doc links to items (`crate::Engine`) are not modules.
fn uses() -> BTreeMap<String, Vec<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path.strip_prefix(&src).expect("under src");
            let top = rel
                .components()
                .next()
                .expect("a component")
                .as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_owned();
            if top == "lib" {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("source");
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            let used = out.entry(top.clone()).or_default();
            for (i, _) in code.match_indices("crate::") {
                let name: String = code[i + 7..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                let next = code[i + 7 + name.len()..].chars().next();
                if !name.is_empty() && next == Some(':') && name != top {
                    used.push(name);
                }
            }
        }
    }
    out
}

#[test]
fn every_module_uses_only_modules_on_lower_floors() {
    let floors = floors();
    let uses = uses();
    for (module, used) in &uses {
        let Some(&own) = floors.get(module) else {
            panic!("module `{module}` has no floor in src/lib.rs");
        };
        for u in used {
            let Some(&theirs) = floors.get(u) else {
                panic!("`{module}` uses `{u}`, which has no floor");
            };
            assert!(
                theirs < own,
                "`{module}` (floor {own}) uses `{u}` (floor {theirs}): not below it"
            );
        }
    }
    assert!(uses.contains_key("engine") && uses["engine"].contains(&"registry".to_owned()));
}

/// The engine's steps are methods on one in-flight state: each step file imports only
/// that state (`in_flight`), the result codecs (`codec`) and the engine's own items
/// (`super::Inner`, `super::Engine`, ...), never another step, so the call core has no
/// cycle and `pipeline.rs` is the one place that says the order.
#[test]
fn engine_step_files_import_only_the_in_flight_state() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/engine");
    let files: Vec<String> = std::fs::read_dir(&dir)
        .expect("src/engine")
        .map(|e| {
            let p = e.expect("entry").path();
            p.file_stem()
                .expect("a name")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert!(files.iter().any(|f| f == "in_flight") && files.iter().any(|f| f == "pipeline"));
    let allowed = ["in_flight", "codec"];
    for file in &files {
        if file == "mod" {
            continue;
        }
        let source = std::fs::read_to_string(dir.join(format!("{file}.rs"))).expect("source");
        // Code only: a doc comment may link to a sibling.
        let text: String = source
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        for (i, _) in text.match_indices("super::") {
            let name: String = text[i + 7..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let is_sibling = files.contains(&name) && name != "mod";
            assert!(
                !is_sibling || allowed.contains(&name.as_str()) || name == *file,
                "src/engine/{file}.rs uses `super::{name}`: a step may use only {allowed:?}"
            );
            if file == "in_flight" || file == "codec" {
                assert!(
                    !is_sibling || name == "codec",
                    "src/engine/{file}.rs uses `super::{name}`: it sits below every step"
                );
            }
        }
    }
}

/// The README's guarantees cite their attacks as `file::test`: each must exist, so a
/// renamed or deleted test cannot leave a guarantee citing nothing.
#[test]
fn every_test_the_readme_cites_exists() {
    let readme = std::fs::read_to_string("README.md").expect("README.md");
    let guarantees = readme
        .split("\n## ")
        .find(|s| s.starts_with("Guarantees"))
        .expect("a Guarantees section");
    let mut cited = 0;
    for cell in guarantees.split('`') {
        let Some((file, name)) = cell.split_once("::") else {
            continue;
        };
        let path = format!("tests/{file}.rs");
        let plain = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        };
        if !plain(file) || !plain(name) {
            continue;
        }
        assert!(
            Path::new(&path).exists(),
            "README.md cites {file}::{name}: no {path}"
        );
        let source = std::fs::read_to_string(&path).expect("a test file");
        assert!(
            source.contains(&format!("fn {name}(")),
            "README.md cites {file}::{name}, which {path} does not define"
        );
        cited += 1;
    }
    assert!(cited >= 30, "the README cites {cited} tests");
}

/// One concept per file: no source file grows past 700 lines.
#[test]
fn no_source_file_is_over_700_lines() {
    let mut stack = vec![std::path::PathBuf::from("src")];
    let mut seen = 0;
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("a source folder") {
            let path = entry.expect("an entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let lines = std::fs::read_to_string(&path)
                    .expect("a source file")
                    .lines()
                    .count();
                assert!(lines <= 700, "{} has {lines} lines", path.display());
                seen += 1;
            }
        }
    }
    assert!(seen > 50, "only {seen} source files found");
}
