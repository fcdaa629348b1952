//! Masking of personal data and secrets in anything that leaves as a log line.
//!
//! Owns: the rules that decide what a log reader may see of a card number, an id number, a
//! phone number, a name, a key or a password. Applied to every formatted line, whatever the
//! format or sink, so a careless `info!("{request:?}")` cannot leak a card number.
//! Must never: be bypassed by a sink, or keep more than the first 6 and last 4 digits of a card
//! (PCI DSS 3.4) or the first 3 and last 4 characters of a resident id number.

use std::borrow::Cow;
use std::sync::LazyLock;

use regex::{Captures, Regex};

/// Field names whose whole value is hidden, in `name=value`, `name="value"` and JSON
/// `"name":"value"` forms. Matched case-insensitively on the whole field name.
const SECRET_FIELDS: &str = "password|passwd|passphrase|secret|private_key|key_material|token|pin\
    |account_name|holder_name|customer_name|payer_name|payee_name|name|mac_key|session_key";

static SECRET_FIELD: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(&format!(
        r#"(?i)(?P<lead>(?:^|[\s{{,"])(?:{SECRET_FIELDS})(?:"\s*:\s*|=))(?P<value>"(?:[^"\\]|\\.)*"|[^\s,}}"]+)"#
    ))
    .expect("static regex")
});

static PEM_PRIVATE_KEY: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|$)",
    )
    .expect("static regex")
});

/// `postgres://user:password@host` and friends.
static URL_PASSWORD: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?P<lead>[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]+:)[^@\s/]+@").expect("static regex")
});

/// Chinese resident id: 17 digits and a digit or X. Checked before card numbers because an
/// 18-digit id would otherwise be masked as a card and keep too much.
static ID_NUMBER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?P<pre>^|[^0-9A-Za-z])(?P<id>[0-9]{17}[0-9Xx])(?P<post>$|[^0-9A-Za-z])")
        .expect("static regex")
});

/// Card and account numbers: 12 to 19 digits, optionally grouped by spaces or dashes of 4.
static CARD_NUMBER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?P<pre>^|[^0-9])(?P<card>[0-9]{12,19}|[0-9]{4}(?:[ -][0-9]{4}){2,3}(?:[ -][0-9]{1,3})?)(?P<post>$|[^0-9])")
        .expect("static regex")
});

/// Mainland mobile numbers: 11 digits starting 13-19.
static PHONE_NUMBER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?P<pre>^|[^0-9])(?P<phone>1[3-9][0-9]{9})(?P<post>$|[^0-9])")
        .expect("static regex")
});

/// Masks one formatted log line. Cheap when nothing matches (the common case): each regex is
/// a single scan and no allocation happens unless something is replaced.
pub fn mask_line(line: &str) -> Cow<'_, str> {
    let mut out = Cow::Borrowed(line);
    out = replace(out, &PEM_PRIVATE_KEY, |_| {
        "[private key redacted]".to_string()
    });
    out = replace(out, &URL_PASSWORD, |c| format!("{}***@", &c["lead"]));
    out = replace(out, &SECRET_FIELD, |c| {
        let quoted = c["value"].starts_with('"');
        format!("{}{}", &c["lead"], if quoted { "\"***\"" } else { "***" })
    });
    out = replace(out, &ID_NUMBER, |c| {
        format!("{}{}{}", &c["pre"], id_number(&c["id"]), &c["post"])
    });
    out = replace(out, &CARD_NUMBER, |c| {
        format!("{}{}{}", &c["pre"], card_number(&c["card"]), &c["post"])
    });
    out = replace(out, &PHONE_NUMBER, |c| {
        format!("{}{}{}", &c["pre"], phone_number(&c["phone"]), &c["post"])
    });
    out
}

fn replace<'a>(
    text: Cow<'a, str>,
    regex: &Regex,
    with: impl Fn(&Captures) -> String,
) -> Cow<'a, str> {
    if !regex.is_match(&text) {
        return text;
    }
    // Matches can share a separator character (`pre`/`post`), so repeat until stable; bounded
    // because every pass strictly reduces the number of unmasked digit runs.
    let mut current = regex.replace_all(&text, &with).into_owned();
    for _ in 0..3 {
        let next = regex.replace_all(&current, &with).into_owned();
        if next == current {
            break;
        }
        current = next;
    }
    Cow::Owned(current)
}

/// `6222021234567890123` -> `622202*********0123`
pub fn card_number(card: &str) -> String {
    let digits: Vec<char> = card.chars().filter(char::is_ascii_digit).collect();
    if digits.len() < 10 {
        return "*".repeat(digits.len());
    }
    let (head, rest) = digits.split_at(6);
    let (middle, tail) = rest.split_at(rest.len() - 4);
    format!(
        "{}{}{}",
        head.iter().collect::<String>(),
        "*".repeat(middle.len()),
        tail.iter().collect::<String>()
    )
}

/// `110101199003077777` -> `110***********7777`
pub fn id_number(id: &str) -> String {
    let chars: Vec<char> = id.chars().collect();
    if chars.len() < 8 {
        return "*".repeat(chars.len());
    }
    format!(
        "{}{}{}",
        chars[..3].iter().collect::<String>(),
        "*".repeat(chars.len() - 7),
        chars[chars.len() - 4..].iter().collect::<String>()
    )
}

/// `13812345678` -> `138****5678`
pub fn phone_number(phone: &str) -> String {
    if phone.len() != 11 || !phone.is_ascii() {
        return "*".repeat(phone.chars().count());
    }
    format!("{}****{}", &phone[..3], &phone[7..])
}

/// `张三丰` -> `**丰`: only the last character stays, as Chinese banks print names on receipts.
pub fn person_name(name: &str) -> String {
    let chars: Vec<char> = name.chars().collect();
    match chars.len() {
        0 => String::new(),
        1 => "*".to_string(),
        n => format!("{}{}", "*".repeat(n - 1), chars[n - 1]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn card_numbers_keep_only_first_six_and_last_four() {
        assert_eq!(
            mask_line("debit card_no=6222021234567890123 ok"),
            "debit card_no=622202*********0123 ok"
        );
        assert_eq!(
            mask_line("card 6222 0212 3456 7890"),
            "card 622202******7890"
        );
        assert!(!mask_line(r#"{"card":"4111111111111111"}"#).contains("11111111"));
    }

    #[test]
    fn id_numbers_and_phones_are_masked() {
        assert_eq!(
            mask_line("id_no=11010119900307777X"),
            "id_no=110***********777X"
        );
        assert_eq!(mask_line("phone=13812345678,"), "phone=138****5678,");
    }

    #[test]
    fn names_passwords_and_keys_are_hidden() {
        assert_eq!(
            mask_line(r#"account_name="张三" amount=100"#),
            r#"account_name="***" amount=100"#
        );
        assert_eq!(
            mask_line(r#"{"name":"李四","amount":100}"#),
            r#"{"name":"***","amount":100}"#
        );
        assert_eq!(mask_line("passphrase=hunter2 next"), "passphrase=*** next");
        assert_eq!(
            mask_line("url postgres://kunpay:s3cret@db:5432/kunpay"),
            "url postgres://kunpay:***@db:5432/kunpay"
        );
        let pem = "key -----BEGIN PRIVATE KEY-----\nMIGH\n-----END PRIVATE KEY----- done";
        assert_eq!(mask_line(pem), "key [private key redacted] done");
    }

    #[test]
    fn ordinary_lines_are_untouched_and_not_copied() {
        let line = "request served status=200 elapsed_ms=12 seq=123456 amount_fen=1000";
        assert!(matches!(mask_line(line), Cow::Borrowed(_)));
        // A field merely containing "name" in a longer word is not a name.
        assert_eq!(
            mask_line("hostname=db1 filename=x"),
            "hostname=db1 filename=x"
        );
    }

    #[test]
    fn helpers_mask_for_display() {
        assert_eq!(card_number("6222021234567890123"), "622202*********0123");
        assert_eq!(person_name("张三丰"), "**丰");
        assert_eq!(phone_number("13812345678"), "138****5678");
    }
}
