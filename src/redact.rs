//! Secrets kept out of logs, errors and answers: URLs are shown with their passwords masked.

/// What a secret is shown as.
pub const MASK: &str = "***";

/// Query parameters whose values are secrets (`?password=…`, `?sslpassword=…`, `?api_key=…`).
const SECRET_PARAMETERS: &[&str] = &["pass", "secret", "key", "token"];

/// A URL fit to show: the password of its user-info and the values of secret-looking query
/// parameters replaced by `***`. Works on mistyped URLs too (`postgress://…`, `postgres//…`,
/// no scheme at all): whatever could be a password before the last `@` is masked.
pub fn redact_url(url: &str) -> String {
    if is_keyword_connection_string(url) {
        return redact_keywords(url);
    }
    // The last `@` ends the user-info even when the password holds `@`, `/` or `?`.
    let shown = match url.rfind('@') {
        Some(at) => format!("{}{}", redact_user_info(&url[..at]), &url[at..]),
        None => url.to_owned(),
    };
    match shown.split_once('?') {
        Some((location, query)) => format!("{location}?{}", redact_query(query)),
        None => shown,
    }
}

/// Everything before the last `@`: `scheme://user:password`, or something mistyped.
fn redact_user_info(before_at: &str) -> String {
    if let Some(scheme_end) = before_at.find("://") {
        let user_info = &before_at[scheme_end + 3..];
        return match user_info.find(':') {
            Some(colon) => format!("{}{}:{MASK}", &before_at[..scheme_end + 3], &user_info[..colon]),
            None => before_at.to_owned(), // A user name alone is no secret.
        };
    }
    if !before_at.contains(':') {
        return before_at.to_owned();
    }
    // Mistyped: keep what looks like a scheme, so the typo stays visible, and mask the rest.
    let scheme = before_at.find(|c: char| !c.is_ascii_alphanumeric() && c != '+' && c != '.' && c != '-');
    format!("{}{MASK}", &before_at[..scheme.unwrap_or(0)])
}

/// libpq's other form, `host=db user=u password=s3cret dbname=x` (spaces around `=` allowed):
/// keyword/value pairs, no scheme.
fn is_keyword_connection_string(text: &str) -> bool {
    let text = text.trim_start();
    let keyword = text.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(text.len());
    !text.contains("://") && keyword > 0 && text[keyword..].trim_start().starts_with('=')
}

/// Masks the values of secret keywords; a value may be quoted (`password='a b'`, with `\'`
/// for a quote inside), and `=` may have spaces around it.
fn redact_keywords(text: &str) -> String {
    let mut shown = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(equals) = rest.find('=') {
        let keyword = rest[..equals].trim_end().rsplit(char::is_whitespace).next().unwrap_or("");
        let after = &rest[equals + 1..];
        let value_start = equals + 1 + (after.len() - after.trim_start().len());
        shown.push_str(&rest[..value_start]);
        rest = &rest[value_start..];
        let value_end = value_length(rest);
        if is_secret_parameter(keyword) {
            shown.push_str(MASK);
        } else {
            shown.push_str(&rest[..value_end]);
        }
        rest = &rest[value_end..];
    }
    shown.push_str(rest);
    shown
}

/// The length of the value at the start of `text`: to the closing quote, or the next space.
fn value_length(text: &str) -> usize {
    let Some(quoted) = text.strip_prefix('\'') else {
        return text.find(char::is_whitespace).unwrap_or(text.len());
    };
    let mut escaped = false;
    for (at, c) in quoted.char_indices() {
        match c {
            '\\' if !escaped => escaped = true,
            '\'' if !escaped => return at + 2,
            _ => escaped = false,
        }
    }
    text.len()
}

fn redact_query(query: &str) -> String {
    let pairs = query.split('&').map(|pair| match pair.split_once('=') {
        Some((name, _)) if is_secret_parameter(name) => format!("{name}={MASK}"),
        _ => pair.to_owned(),
    });
    pairs.collect::<Vec<_>>().join("&")
}

fn is_secret_parameter(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_PARAMETERS.iter().any(|secret| name.contains(secret))
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn masks_the_password_and_keeps_the_rest() {
        assert_eq!(redact_url("postgres://u:s3cret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact_url("postgres://u:p@ss:w@rd@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("sqlite://data/chitram.db"), "sqlite://data/chitram.db");
        assert_eq!(redact_url("http://key:s3cret@minio:9000"), "http://key:***@minio:9000");
    }

    #[test]
    fn masks_passwords_in_mistyped_urls() {
        for url in [
            "postgress://u:s3cret@h/db",
            "postgres//u:s3cret@h/db",
            "postgres:/u:s3cret@h/db",
            "u:s3cret@h/db",
            "postgres://u:s3cret@h/db?sslmode=require&password=s3cret",
            "postgres://h/db?user=u&Password=s3cret",
            "postgres://h/db?sslpassword=s3cret",
            "postgres://u:s3/cret?@h/db",
            "postgres://h/db?password=s3cret@x",
        ] {
            let shown = redact_url(url);
            assert!(!shown.contains("s3cret"), "{url} -> {shown}");
            assert!(shown.contains("***"), "{url} -> {shown}");
        }
        assert_eq!(redact_url("postgres://h/db?sslmode=require"), "postgres://h/db?sslmode=require");
        assert_eq!(redact_url("postgress://u:s3cret@h/db"), "postgress://u:***@h/db");
        assert_eq!(redact_url("postgres//u:s3cret@h/db"), "postgres***@h/db");
    }

    #[test]
    fn masks_passwords_in_keyword_connection_strings() {
        assert_eq!(redact_url("host=db user=u password=s3cret dbname=x"), "host=db user=u password=*** dbname=x");
        assert_eq!(redact_url("password='s3 cr\\'et' host=db"), "password=*** host=db");
        assert_eq!(redact_url("host=db sslpassword=s3cret"), "host=db sslpassword=***");
        assert_eq!(redact_url("host=db dbname=x"), "host=db dbname=x");
        assert_eq!(redact_url("host = db password = s3cret dbname=x"), "host = db password = *** dbname=x");
        assert_eq!(redact_url("password= 's3 cret'"), "password= ***");
        assert_eq!(redact_url("postgres//u:s3cret@h/db?password=x"), "postgres***@h/db?password=***");
    }
}
