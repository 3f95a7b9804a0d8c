//! Colours: each status has one, so a failed step stands out. The styles go into the text as
//! escape codes; `output::stdout` drops them when stdout is no terminal or `NO_COLOR` is set.

use std::borrow::Cow;

use anstyle::{AnsiColor, Style};

/// The colour of a run, step or task status, by the engine's text for it.
pub(crate) fn status(text: &str) -> Style {
    let color = match text {
        "completed" => AnsiColor::Green,
        "failed" => AnsiColor::Red,
        "started" => AnsiColor::Yellow,
        "cancelled" => AnsiColor::Magenta,
        _ => return Style::new().dimmed(),
    };
    Style::new().fg_color(Some(color.into()))
}

/// Errors: red like a failure, without the weight of one.
pub(crate) const ERROR: Style = Style::new().fg_color(Some(anstyle::Color::Ansi(AnsiColor::Red)));

/// Column titles.
pub(crate) const HEADER: Style = Style::new().bold();

/// `text` in `style`; nothing added to an empty text, so blank cells stay blank.
pub(crate) fn paint(style: Style, text: &str) -> String {
    if text.is_empty() {
        return String::new();
    }
    format!("{style}{}{style:#}", visible(text))
}

/// Text from the database that another party wrote (a handler's error, a worker's name, a
/// schedule's expression) with its control characters shown as escapes (`\u{1b}`, `\n`):
/// printed raw, an escape sequence in a handler's error could move the cursor, rewrite what
/// the terminal shows or set its clipboard. Bidirectional overrides are escaped too, so a
/// message cannot display reversed.
pub(crate) fn visible(text: &str) -> Cow<'_, str> {
    escape(text, false)
}

/// [`visible`] for a text shown on several lines: its newlines stay.
pub(crate) fn visible_lines(text: &str) -> Cow<'_, str> {
    escape(text, true)
}

fn escape(text: &str, keep_newlines: bool) -> Cow<'_, str> {
    let hidden = |c: char| {
        (c.is_control() && !(keep_newlines && c == '\n'))
            || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !text.contains(hidden) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() && hidden(c) {
            out.extend(c.escape_debug());
        } else if hidden(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::{visible, visible_lines};

    #[test]
    fn control_characters_and_bidi_overrides_are_shown_not_obeyed() {
        assert_eq!(visible("plain text: ok"), "plain text: ok");
        assert_eq!(visible("a\u{1b}[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(
            visible("x\u{1b}]52;c;aGk=\u{7}"),
            "x\\u{1b}]52;c;aGk=\\u{7}"
        );
        assert_eq!(visible("one\ntwo\r"), "one\\ntwo\\r");
        assert_eq!(visible_lines("one\ntwo\r"), "one\ntwo\\r");
        assert_eq!(visible("abc\u{202e}fed"), "abc\\u{202e}fed");
        assert_eq!(visible("\u{9b}31m"), "\\u{9b}31m");
        // Showing twice changes nothing more: cells are escaped once, wherever they pass.
        let once = visible("a\u{1b}b").into_owned();
        assert_eq!(visible(&once), once);
    }
}
