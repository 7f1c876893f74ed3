//! Updating one `## ` section of a Markdown document (`docs/benchmarks.md`) while keeping every
//! other section exactly as it was: several benchmarks write their own sections of one file.
//!
//! Owns only the section it is asked to write. Never reorders or rewrites other sections.

use std::path::Path;

use crate::Error;

/// `document` with the section titled `title` (a `## title` heading up to the next `## `
/// heading) replaced by `body`, or with the section appended when it is absent.
#[must_use]
pub fn replace_section(document: &str, title: &str, body: &str) -> String {
    let heading = format!("## {title}");
    let mut out = String::with_capacity(document.len() + body.len());
    let section = format!("{heading}\n\n{}\n", body.trim_end());
    let mut inside = false;
    let mut written = false;
    for line in document.lines() {
        if line.trim_end() == heading {
            inside = true;
            continue;
        }
        if inside && line.starts_with("## ") {
            inside = false;
            out.push_str(&section);
            out.push('\n');
            written = true;
        }
        if !inside {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !written {
        if inside {
            out.push_str(&section);
        } else {
            if document.trim().is_empty() {
                out.clear();
                out.push_str("# Benchmarks\n\n");
            } else if !out.ends_with("\n\n") {
                out.push('\n');
            }
            out.push_str(&section);
        }
    }
    out
}

/// Replace (or append) the section `title` of the file at `path`, creating the file if needed.
pub fn write_section(path: &Path, title: &str, body: &str) -> Result<(), Error> {
    let document = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(Error::Document {
                action: "read",
                path: path.to_owned(),
                source,
            })
        }
    };
    std::fs::write(path, replace_section(&document, title, body)).map_err(|source| {
        Error::Document {
            action: "write",
            path: path.to_owned(),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "# Benchmarks\n\nIntro.\n\n## Core\n\ncore figures\n\n## Webhook under load\n\nold figures\n\n## Data plane\n\niperf figures\n";

    #[test]
    fn only_the_named_section_changes() {
        let out = replace_section(DOC, "Webhook under load", "new figures");
        assert_eq!(
            out,
            "# Benchmarks\n\nIntro.\n\n## Core\n\ncore figures\n\n## Webhook under load\n\nnew figures\n\n## Data plane\n\niperf figures\n"
        );
    }

    #[test]
    fn a_missing_section_is_appended_after_the_others() {
        let out = replace_section("# Benchmarks\n\n## Core\n\ncore figures\n", "Load", "x");
        assert_eq!(
            out,
            "# Benchmarks\n\n## Core\n\ncore figures\n\n## Load\n\nx\n"
        );
    }

    #[test]
    fn the_last_section_is_replaced_to_the_end_of_the_file() {
        let out = replace_section("# B\n\n## Load\n\nold\nmore old\n", "Load", "new");
        assert_eq!(out, "# B\n\n## Load\n\nnew\n");
    }

    #[test]
    fn an_empty_document_gets_a_title_and_the_section() {
        assert_eq!(
            replace_section("", "Load", "x"),
            "# Benchmarks\n\n## Load\n\nx\n"
        );
    }

    #[test]
    fn writing_twice_gives_the_same_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("benchmarks.md");
        std::fs::write(&path, DOC).expect("write");
        write_section(&path, "Webhook under load", "figures").expect("first");
        let once = std::fs::read_to_string(&path).expect("read");
        write_section(&path, "Webhook under load", "figures").expect("second");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), once);
        assert!(once.contains("## Data plane\n\niperf figures\n"));
    }
}
