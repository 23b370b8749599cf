//! Compile-time guarantees: every row of DESIGN.md's misuse table is a trybuild case.
//!
//! `ui-tests/fail/<case>.rs` holds exactly one misuse and must not compile; its
//! `.stderr` is the blessed compiler output. `ui-tests/pass/<case>.rs` is its twin doing
//! the right thing, which must compile and run. Each fail case starts with one or more
//! `// expected: <substring>` lines naming what its `.stderr` must say.
//!
//! The meta-tests below keep the snapshots honest without trybuild: a `.stderr`
//! blessed with the wrong error, a case without its twin, an empty snapshot, a custom
//! diagnostic that stopped being the first line, or cases silently disappearing all
//! fail the run. Regenerate snapshots with
//! `TRYBUILD=overwrite cargo test --all-features --test ui -- --exact ui`,
//! then read them.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

/// The number of compile-fail cases may grow, never shrink silently: raise this when
/// adding cases, and only lower it together with the design's misuse table.
const MIN_FAIL_CASES: usize = 31;

/// Sources whose `#[diagnostic::on_unimplemented]` messages the cases prove.
const DIAGNOSTIC_SOURCES: &[&str] = &["src/state.rs", "src/sink.rs", "src/registry.rs"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `.rs` files of `ui-tests/<dir>`, by case name (file stem), sorted.
fn cases(dir: &str) -> Vec<(String, PathBuf)> {
    let dir = root().join("ui-tests").join(dir);
    let mut out: Vec<(String, PathBuf)> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .map(|p| {
            let stem = p
                .file_stem()
                .expect("file stem")
                .to_string_lossy()
                .into_owned();
            (stem, p)
        })
        .collect();
    out.sort();
    out
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The `// expected: ...` lines a fail case opens with (contiguous, at the top).
fn expected(source: &str) -> Vec<String> {
    source
        .lines()
        .map_while(|l| l.strip_prefix("// expected: "))
        .map(|s| s.trim().to_owned())
        .collect()
}

/// The header lines of the errors in a `.stderr` (`error[E0277]: ...`, `error: ...`).
fn error_headers(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.starts_with("error[") || l.starts_with("error:"))
        .collect()
}

/// Every `message = "..."` of an `on_unimplemented` attribute in the diagnostic sources.
fn custom_messages() -> Vec<String> {
    let mut out = Vec::new();
    for src in DIAGNOSTIC_SOURCES {
        let text = read(&root().join(src));
        let mut lines = text.lines();
        while let Some(line) = lines.next() {
            if !line
                .trim_start()
                .starts_with("#[diagnostic::on_unimplemented(")
            {
                continue;
            }
            for attr_line in lines.by_ref() {
                let t = attr_line.trim();
                if let Some(rest) = t.strip_prefix("message = \"") {
                    let msg = rest.trim_end_matches(',').trim_end_matches('"');
                    out.push(msg.to_owned());
                }
                if t.starts_with(")]") {
                    break;
                }
            }
        }
    }
    out
}

/// Whether `expected` is (part of) the custom message `template`, whose `{Self}`
/// stands for any type.
fn matches_template(expected: &str, template: &str) -> bool {
    template.contains(expected)
        || template
            .split("{Self}")
            .filter(|f| !f.is_empty())
            .all(|fragment| expected.contains(fragment))
}

/// The compiler lists a trait's implementors in its notes, and the `axum` feature adds
/// one (`WsSink`), so the snapshots are recorded with `--all-features`: the README's
/// and CI's test command.
#[test]
#[cfg_attr(
    not(feature = "axum"),
    ignore = "snapshots are recorded with --all-features (the README's test command)"
)]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("ui-tests/fail/*.rs");
    t.pass("ui-tests/pass/*.rs");
}

#[test]
fn every_fail_case_declares_what_it_expects() {
    for (name, path) in cases("fail") {
        let exp = expected(&read(&path));
        assert!(!exp.is_empty(), "{name}: no `// expected:` line at the top");
        assert!(
            exp.iter().all(|e| !e.is_empty()),
            "{name}: an empty `// expected:` line"
        );
    }
}

#[test]
fn every_stderr_says_what_its_case_expects() {
    let templates = custom_messages();
    assert!(
        templates.len() >= 7,
        "found only {} on_unimplemented messages in {DIAGNOSTIC_SOURCES:?}: {templates:?}",
        templates.len()
    );
    let mut custom_cases = 0;
    for (name, path) in cases("fail") {
        let stderr_path = path.with_extension("stderr");
        assert!(stderr_path.exists(), "{name}: no {}", stderr_path.display());
        let stderr = read(&stderr_path);
        let headers = error_headers(&stderr);
        assert!(!headers.is_empty(), "{name}: the .stderr holds no error");
        let exp = expected(&read(&path));
        for e in &exp {
            assert!(
                stderr.contains(e.as_str()),
                "{name}: .stderr does not contain {e:?}:\n{stderr}"
            );
        }
        // A custom diagnostic must be the error's first line, not a note under a
        // generic "trait bound not satisfied": the first error of the case says it,
        // and each further expected message heads an error of its own.
        let custom: Vec<&String> = exp
            .iter()
            .filter(|e| templates.iter().any(|t| matches_template(e, t)))
            .collect();
        if custom.is_empty() {
            continue;
        }
        custom_cases += 1;
        assert!(
            headers[0].contains(custom[0].as_str()),
            "{name}: the first error line is {:?}, not {:?}",
            headers[0],
            custom[0]
        );
        for (i, e) in custom.iter().enumerate() {
            let holders: Vec<usize> = (0..headers.len())
                .filter(|&h| headers[h].contains(e.as_str()))
                .collect();
            assert!(
                !holders.is_empty(),
                "{name}: no error line says {e:?}: {headers:?}"
            );
            for other in &custom[..i] {
                assert!(
                    holders
                        .iter()
                        .any(|&h| !headers[h].contains(other.as_str())),
                    "{name}: {e:?} has no error line of its own"
                );
            }
        }
    }
    assert!(
        custom_cases >= 15,
        "only {custom_cases} cases prove a custom diagnostic"
    );
}

#[test]
fn every_custom_diagnostic_is_proven_by_a_case() {
    let all_expected: Vec<String> = cases("fail")
        .iter()
        .flat_map(|(_, path)| expected(&read(path)))
        .collect();
    for template in custom_messages() {
        assert!(
            all_expected.iter().any(|e| matches_template(e, &template)),
            "no fail case expects the diagnostic {template:?}"
        );
    }
}

const NO_SINK: &str =
    "error[E0277]: this dispatcher has no event sink: call `.sink(..)` before dispatching";
const NO_USER: &str =
    "error[E0277]: this dispatcher has no user: call `.user(..)` before dispatching";

#[test]
fn two_missing_parts_give_two_errors() {
    let path = root().join("ui-tests/fail/dispatch_without_sink_or_user.stderr");
    let stderr = read(&path);
    assert_eq!(
        error_headers(&stderr),
        [NO_SINK, NO_USER],
        "exactly one error per missing part"
    );
}

#[test]
fn every_dispatch_method_gives_one_error_per_missing_part() {
    for method in ["dispatch", "dispatch_all", "notify", "call"] {
        for (part, header) in [("sink", NO_SINK), ("user", NO_USER)] {
            let path = root().join(format!("ui-tests/fail/{method}_without_{part}.stderr"));
            let stderr = read(&path);
            assert_eq!(
                error_headers(&stderr),
                [header],
                "{method} without a {part}: exactly one error"
            );
        }
    }
}

#[test]
fn every_fail_case_has_a_pass_twin_and_vice_versa() {
    let fail: BTreeSet<String> = cases("fail").into_iter().map(|(n, _)| n).collect();
    let pass: BTreeSet<String> = cases("pass").into_iter().map(|(n, _)| n).collect();
    let no_twin: Vec<_> = fail.difference(&pass).collect();
    let orphans: Vec<_> = pass.difference(&fail).collect();
    assert!(
        no_twin.is_empty(),
        "fail cases without a pass twin: {no_twin:?}"
    );
    assert!(
        orphans.is_empty(),
        "pass cases without a fail case: {orphans:?}"
    );
}

#[test]
fn fail_cases_do_not_silently_disappear() {
    let n = cases("fail").len();
    assert!(
        n >= MIN_FAIL_CASES,
        "{n} fail cases, expected at least {MIN_FAIL_CASES}"
    );
}

#[test]
fn no_stderr_is_empty_or_orphaned() {
    let dir = root().join("ui-tests/fail");
    let names: BTreeSet<String> = cases("fail").into_iter().map(|(n, _)| n).collect();
    let mut seen = 0;
    for entry in fs::read_dir(&dir).expect("ui-tests/fail") {
        let path = entry.expect("directory entry").path();
        if path.extension().is_some_and(|x| x == "stderr") {
            seen += 1;
            let stem = path
                .file_stem()
                .expect("file stem")
                .to_string_lossy()
                .into_owned();
            assert!(names.contains(&stem), "{} has no case", path.display());
            assert!(
                !read(&path).trim().is_empty(),
                "{} is empty",
                path.display()
            );
        }
    }
    assert_eq!(
        seen,
        names.len(),
        "every fail case needs exactly one .stderr"
    );
}

#[test]
fn pass_cases_expect_nothing_to_fail() {
    for (name, path) in cases("pass") {
        assert!(
            expected(&read(&path)).is_empty(),
            "pass/{name} has `// expected:` lines"
        );
        assert!(
            !path.with_extension("stderr").exists(),
            "pass/{name} has a .stderr"
        );
    }
}
