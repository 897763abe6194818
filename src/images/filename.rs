//! The name an upload is shown under: the client's filename, made safe to display and to use
//! in a Content-Disposition header or a download dialog.

/// Longest name kept, in bytes (the common filesystem limit).
pub const MAX_FILENAME_BYTES: usize = 255;
const FALLBACK: &str = "upload";

/// A sanitised filename: no path, no control characters, at most [`MAX_FILENAME_BYTES`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filename(String);

impl Filename {
    /// Never fails: whatever the client sent becomes a safe name, `upload` at worst.
    pub fn sanitise(raw: Option<&str>) -> Self {
        let raw = raw.unwrap_or("");
        // Both separators: a Windows client sends `C:\Users\me\cat.png`.
        let base = raw.rsplit(['/', '\\']).next().unwrap_or("");
        let cleaned: String = base.chars().filter(|c| !c.is_control()).collect();
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
            prop_assert!(!name.starts_with('.'));
        }
    }
}
