//! The name an upload is shown under: the client's filename, made safe to display and to use
//! in a Content-Disposition header or a download dialog.

/// Longest name kept, in bytes (the common filesystem limit).
pub const MAX_FILENAME_BYTES: usize = 255;
const FALLBACK: &str = "upload";

/// A sanitised filename: no path, no control or format characters, at most
/// [`MAX_FILENAME_BYTES`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filename(String);

impl Filename {
    /// Never fails: whatever the client sent becomes a safe name, `upload` at worst.
    pub fn sanitise(raw: Option<&str>) -> Self {
        let raw = raw.unwrap_or("");
        // Both separators: a Windows client sends `C:\Users\me\cat.png`.
        let base = raw.rsplit(['/', '\\']).next().unwrap_or("");
        let cleaned: String = base.chars().filter(|&c| !c.is_control() && !is_format_character(c)).collect();
        // Leading dots would hide the file or make it `..`; surrounding blanks are noise.
        let trimmed = cleaned.trim().trim_start_matches('.').trim();
        if trimmed.is_empty() {
            return Self(FALLBACK.to_owned());
        }
        Self(truncate_keeping_extension(trimmed, MAX_FILENAME_BYTES))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// Unicode general category Cf (format): invisible characters that change how the text around
/// them is shown. Bidirectional overrides and isolates make `gpj.exe` display as `exe.jpg`;
/// zero-width characters make two different names look the same. (Unicode 15.1.)
const FORMAT_CHARACTERS: &[(char, char)] = &[
    ('\u{00AD}', '\u{00AD}'),
    ('\u{0600}', '\u{0605}'),
    ('\u{061C}', '\u{061C}'),
    ('\u{06DD}', '\u{06DD}'),
    ('\u{070F}', '\u{070F}'),
    ('\u{0890}', '\u{0891}'),
    ('\u{08E2}', '\u{08E2}'),
    ('\u{180E}', '\u{180E}'),
    ('\u{200B}', '\u{200F}'),
    ('\u{202A}', '\u{202E}'),
    ('\u{2060}', '\u{2064}'),
    ('\u{2066}', '\u{206F}'),
    ('\u{FEFF}', '\u{FEFF}'),
    ('\u{FFF9}', '\u{FFFB}'),
    ('\u{110BD}', '\u{110BD}'),
    ('\u{110CD}', '\u{110CD}'),
    ('\u{13430}', '\u{1343F}'),
    ('\u{1BCA0}', '\u{1BCA3}'),
    ('\u{1D173}', '\u{1D17A}'),
    ('\u{E0001}', '\u{E0001}'),
    ('\u{E0020}', '\u{E007F}'),
];

fn is_format_character(c: char) -> bool {
    FORMAT_CHARACTERS.iter().any(|&(first, last)| (first..=last).contains(&c))
}

/// Cuts `name` to at most `max` bytes on a character boundary, keeping a short extension.
fn truncate_keeping_extension(name: &str, max: usize) -> String {
    if name.len() <= max {
        return name.to_owned();
    }
    let extension = match name.rfind('.') {
        Some(dot) if name.len() - dot <= 16 => &name[dot..],
        _ => "",
    };
    let mut stem_end = max - extension.len();
    while !name.is_char_boundary(stem_end) {
        stem_end -= 1;
    }
    format!("{}{extension}", &name[..stem_end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn strips_paths_and_control_characters() {
        assert_eq!(Filename::sanitise(Some("../../etc/passwd")).as_str(), "passwd");
        assert_eq!(Filename::sanitise(Some(r"C:\Users\me\cat.png")).as_str(), "cat.png");
        assert_eq!(Filename::sanitise(Some("ca\u{0}t\n.png")).as_str(), "cat.png");
        assert_eq!(Filename::sanitise(Some("..")).as_str(), "upload");
        assert_eq!(Filename::sanitise(Some(".hidden.png")).as_str(), "hidden.png");
        assert_eq!(Filename::sanitise(None).as_str(), "upload");
    }

    #[test]
    fn strips_bidirectional_overrides_and_other_format_characters() {
        // "cat\u{202E}gpj.exe" displays as "catexe.jpg".
        assert_eq!(Filename::sanitise(Some("cat\u{202E}gpj.exe")).as_str(), "catgpj.exe");
        assert_eq!(Filename::sanitise(Some("\u{2066}a\u{2069}\u{200B}b\u{200D}\u{FEFF}.png")).as_str(), "ab.png");
        assert_eq!(Filename::sanitise(Some("\u{202A}\u{202B}\u{202C}\u{202D}\u{200E}\u{200F}")).as_str(), "upload");
        assert_eq!(Filename::sanitise(Some("\u{E0041}x\u{00AD}y.gif")).as_str(), "xy.gif");
        // Visible non-ASCII text stays.
        assert_eq!(Filename::sanitise(Some("चित्रम् 猫.png")).as_str(), "चित्रम् 猫.png");
    }

    #[test]
    fn shortens_overlong_names_keeping_the_extension() {
        let name = format!("{}.jpeg", "é".repeat(300));
        let safe = Filename::sanitise(Some(&name));
        assert!(safe.as_str().len() <= MAX_FILENAME_BYTES);
        assert!(safe.as_str().ends_with(".jpeg"));
    }

    proptest! {
        #[test]
        fn any_input_becomes_a_safe_name(raw in any::<String>()) {
            let safe = Filename::sanitise(Some(&raw));
            let name = safe.as_str();
            prop_assert!(!name.is_empty() && name.len() <= MAX_FILENAME_BYTES);
            prop_assert!(!name.contains(['/', '\\']) && !name.chars().any(char::is_control));
            prop_assert!(!name.chars().any(is_format_character));
            prop_assert!(!name.starts_with('.'));
        }
    }
}
