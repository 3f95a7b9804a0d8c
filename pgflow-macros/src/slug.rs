//! The slug rule, as in `pgflow_core::check_slug` (kept in step with it by the tests of both),
//! so that literal slugs are checked at compile time.

/// What is wrong with `slug`, if anything.
fn slug_problem(slug: &str) -> Option<String> {
    let mut chars = slug.chars();
    let first = chars.next()?;
    let len = slug.chars().count();
    if len > 128 {
        return Some(format!(
            "a slug has at most 128 characters, this one has {len}"
        ));
    }
    if !(first.is_ascii_alphabetic() || first == '_') {
        return Some(format!(
            "a slug starts with an ASCII letter or `_`, not {first:?}"
        ));
    }
    if let Some(bad) = chars.find(|c| !(c.is_ascii_alphanumeric() || *c == '_')) {
        return Some(format!(
            "a slug contains only ASCII letters, digits and `_`, not {bad:?}"
        ));
    }
    if slug == "run" {
        return Some(
            "`run` is reserved: it is the key under which steps receive the flow input".into(),
        );
    }
    None
}

/// Like [`slug_problem`], also rejecting the empty slug.
pub(crate) fn check(slug: &str) -> Option<String> {
    if slug.is_empty() {
        return Some("a slug cannot be empty".into());
    }
    slug_problem(slug)
}

#[cfg(test)]
mod tests {
    use super::check;

    #[test]
    fn same_rule_as_the_engine() {
        for ok in ["a", "_", "A_1", "runner", "Run"] {
            assert_eq!(check(ok), None, "{ok}");
        }
        assert_eq!(check(&"a".repeat(128)), None);
        for bad in ["", "run", "1a", "a-b", "é", "a b"] {
            assert!(check(bad).is_some(), "{bad}");
        }
        assert!(check(&"a".repeat(129)).is_some());
    }
}
