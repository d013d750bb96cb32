//! Times as people read them: "in 24 hours", "3 minutes ago"; and text as a terminal shows it.

use std::borrow::Cow;

/// `text` with its control characters escaped (`\u{1b}`, `\n`): what a SCIM client wrote in a
/// name must not move a terminal's cursor over the lines around it, or end a line; nor, with
/// the marks that set the direction of text (`\u{202e}`), show the rest of its line in
/// another order than it was written.
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(hidden) {
        return Cow::Borrowed(text);
    }
    let mut shown = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if hidden(c) {
            shown.extend(c.escape_default());
        } else {
            shown.push(c);
        }
    }
    Cow::Owned(shown)
}

/// Whether `c` is shown escaped: a control character, a line or paragraph separator, or a
/// mark that changes the direction of the text after it (Unicode's bidirectional controls).
pub fn hidden(c: char) -> bool {
    let bidi = matches!(
        c,
        '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
    );
    c.is_control() || bidi
}

/// `seconds` from now (negative: in the past) in words, rounded to the nearest unit.
pub fn relative(seconds: i64) -> String {
    let span = seconds.unsigned_abs();
    if span < 5 {
        return "just now".to_owned();
    }
    let (count, unit) = match span {
        0..60 => (span, "second"),
        60..3_570 => ((span + 30) / 60, "minute"),
        3_570..172_800 => ((span + 1_800) / 3_600, "hour"),
        _ => ((span + 43_200) / 86_400, "day"),
    };
    let plural = if count == 1 { "" } else { "s" };
    if seconds > 0 {
        format!("in {count} {unit}{plural}")
    } else {
        format!("{count} {unit}{plural} ago")
    }
}

/// Unix time `at` as an RFC 3339 UTC time, to the second.
pub fn timestamp(at: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(at)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| at.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_words() {
        assert_eq!(relative(86_399), "in 24 hours");
        assert_eq!(relative(-180), "3 minutes ago");
        assert_eq!(relative(-61), "1 minute ago");
        assert_eq!(relative(2), "just now");
        assert_eq!(relative(30), "in 30 seconds");
        assert_eq!(relative(3_599), "in 1 hour");
        assert_eq!(relative(-7 * 86_400), "7 days ago");
        assert_eq!(timestamp(0), "1970-01-01T00:00:00Z");
    }
}
