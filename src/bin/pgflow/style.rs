//! Colours: each status has one, so a failed step stands out. The styles go into the text as
//! escape codes; `output::stdout` drops them when stdout is no terminal or `NO_COLOR` is set.

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
    format!("{style}{text}{style:#}")
}
