//! The slug rule shared by flows and steps: the engine's `pgflow.is_valid_slug`; and the one
//! rule flow slugs add, their length.

use crate::SlugProblem;

/// The longest valid slug, in characters.
pub const MAX_SLUG_LEN: usize = 128;

/// The longest flow slug, in characters. A flow's pgmq queue is named after it, and pgmq refuses
/// queue names of more than 47 characters: its tables are named from the queue name with a
/// prefix of up to 16 characters (`template_pgmq_q_`), within PostgreSQL's 63-byte identifiers.
pub(crate) const MAX_FLOW_SLUG_LEN: usize = 47;

/// Whether `slug` is a valid flow or step slug, by the engine's rule (`pgflow.is_valid_slug`):
/// not empty, at most 128 characters, matching `^[a-zA-Z_][a-zA-Z0-9_]*$`, and not `run`.
/// A flow slug must also be short enough to name a pgmq queue, at most 47 characters, which
/// [`Flow::validate`](crate::Flow::validate) checks as well.
///
/// ```
/// use pgflow_core::is_valid_slug;
///
/// assert!(is_valid_slug("order_processing"));
/// assert!(is_valid_slug("_step2"));
/// assert!(!is_valid_slug("2fast"));
/// assert!(!is_valid_slug("with-dash"));
/// assert!(!is_valid_slug("run"));
/// ```
pub fn is_valid_slug(slug: &str) -> bool {
    check_slug(slug).is_ok()
}

/// Like [`is_valid_slug`], but tells what is wrong.
///
/// ```
/// use pgflow_core::{check_slug, SlugProblem};
///
/// assert_eq!(check_slug("fetch"), Ok(()));
/// assert_eq!(check_slug("a b"), Err(SlugProblem::InvalidChar(' ')));
/// ```
pub fn check_slug(slug: &str) -> Result<(), SlugProblem> {
    let mut chars = slug.chars();
    let Some(first) = chars.next() else {
        return Err(SlugProblem::Empty);
    };
    let len = slug.chars().count();
    if len > MAX_SLUG_LEN {
        return Err(SlugProblem::TooLong { len });
    }
    if !(first.is_ascii_alphabetic() || first == '_') {
        return Err(SlugProblem::InvalidStart(first));
    }
    if let Some(bad) = chars.find(|c| !(c.is_ascii_alphanumeric() || *c == '_')) {
        return Err(SlugProblem::InvalidChar(bad));
    }
    if slug == "run" {
        return Err(SlugProblem::Reserved);
    }
    Ok(())
}

/// Like [`check_slug`], plus the length of a flow slug, which names the flow's queue.
pub(crate) fn check_flow_slug(slug: &str) -> Result<(), SlugProblem> {
    check_slug(slug)?;
    // Slugs are ASCII by now, so bytes are characters.
    if slug.len() > MAX_FLOW_SLUG_LEN {
        return Err(SlugProblem::FlowTooLong { len: slug.len() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_engine_pattern() {
        for ok in ["a", "A", "_", "_a1", "order_processing", "Z9_z"] {
            assert!(is_valid_slug(ok), "{ok}");
        }
        assert!(is_valid_slug(&"a".repeat(128)));
    }

    #[test]
    fn rejects_with_reason() {
        assert_eq!(check_slug(""), Err(SlugProblem::Empty));
        assert_eq!(
            check_slug(&"a".repeat(129)),
            Err(SlugProblem::TooLong { len: 129 })
        );
        assert_eq!(check_slug("1a"), Err(SlugProblem::InvalidStart('1')));
        assert_eq!(check_slug("a-b"), Err(SlugProblem::InvalidChar('-')));
        assert_eq!(check_slug("é"), Err(SlugProblem::InvalidStart('é')));
        assert_eq!(check_slug("run"), Err(SlugProblem::Reserved));
        assert!(is_valid_slug("Run"));
        assert!(is_valid_slug("runner"));
    }

    #[test]
    fn flow_slugs_fit_a_pgmq_queue_name() {
        assert_eq!(check_flow_slug(&"a".repeat(47)), Ok(()));
        assert_eq!(
            check_flow_slug(&"a".repeat(48)),
            Err(SlugProblem::FlowTooLong { len: 48 })
        );
        assert_eq!(
            check_flow_slug(&"a".repeat(129)),
            Err(SlugProblem::TooLong { len: 129 })
        );
        assert_eq!(check_flow_slug("run"), Err(SlugProblem::Reserved));
        // Step slugs keep the engine's 128.
        assert_eq!(check_slug(&"a".repeat(128)), Ok(()));
        let shape = crate::FlowShape {
            slug: "a".repeat(48),
            options: crate::FlowOptions::new(),
            steps: vec![crate::StepShape::new("b".repeat(128))],
        };
        assert!(matches!(
            shape.validate(),
            Err(crate::Error::InvalidFlowSlug {
                problem: SlugProblem::FlowTooLong { len: 48 },
                ..
            })
        ));
        assert_eq!(
            SlugProblem::FlowTooLong { len: 48 }.to_string(),
            "a flow slug names its pgmq queue, and pgmq refuses queue names of more than 47 \
             characters; this one has 48"
        );
    }
}
