//! Who is calling, and the ownership rules of DESIGN's table as pure functions: every route
//! asks here, so the rules are written once.

use uuid::Uuid;

use super::AuthError;
use crate::metadata::{ImageRecord, Role, Visibility};

/// The caller of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Accounts are off (`[auth] enabled = false`): everyone may do everything, as before
    /// accounts existed.
    Open,
    /// No credentials.
    Anonymous,
    /// A user, by API key or access token.
    User(Identity),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: Uuid,
    pub username: String,
    pub role: Role,
    /// The API key used, if one was.
    pub key: Option<Uuid>,
}

impl Caller {
    pub fn is_admin(&self) -> bool {
        match self {
            Caller::Open => true,
            Caller::Anonymous => false,
            Caller::User(identity) => identity.role == Role::Admin,
        }
    }

    pub fn user(&self) -> Option<&Identity> {
        match self {
            Caller::User(identity) => Some(identity),
            _ => None,
        }
    }

    /// Signed-in users only (with accounts off, everyone).
    pub fn require_signed_in(&self) -> Result<(), AuthError> {
        match self {
            Caller::Anonymous => Err(AuthError::MissingCredentials),
            _ => Ok(()),
        }
    }

    /// Admins only (with accounts off, everyone).
    pub fn require_admin(&self) -> Result<(), AuthError> {
        self.require_signed_in()?;
        if self.is_admin() { Ok(()) } else { Err(AuthError::Forbidden("this needs an admin")) }
    }

    /// Whether the caller may see an image and its bytes: a public one, anyone; a private
    /// one, its owner or an admin (or a signed URL, which the route checks).
    pub fn may_read(&self, image: &ImageRecord) -> bool {
        image.visibility == Visibility::Public || self.owns_or_administers(image)
    }

    /// Whether the caller may delete an image or change its visibility: its owner or an admin.
    /// The error for someone else tells what they may already know: `None` when they may not
    /// even see the image (the route answers 404, as for an unknown id).
    pub fn may_change(&self, image: &ImageRecord) -> Result<(), Option<AuthError>> {
        if self.owns_or_administers(image) {
            return Ok(());
        }
        if !self.may_read(image) {
            return Err(None);
        }
        Err(Some(match self {
            Caller::Anonymous => AuthError::MissingCredentials,
            _ => AuthError::Forbidden("only the image's owner or an admin may change it"),
        }))
    }

    fn owns_or_administers(&self, image: &ImageRecord) -> bool {
        self.is_admin() || self.user().is_some_and(|identity| image.owner == Some(identity.user))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::ImageRecord;

    fn image(owner: Uuid, visibility: Visibility) -> ImageRecord {
        ImageRecord {
            id: Uuid::now_v7(),
            filename: "a.png".into(),
            content_type: "image/png".into(),
            file_size: 1,
            width: 1,
            height: 1,
            blob: crate::blob::BlobKey::from_digest(&[7; 32]),
            created_at: chrono::Utc::now(),
            replicas: vec![],
            owner: Some(owner),
            visibility,
            variants: Vec::new(),
        }
    }

    fn user(id: Uuid, role: Role) -> Caller {
        Caller::User(Identity { user: id, username: "u".into(), role, key: None })
    }

    /// DESIGN's table: metadata and file of a public image, anyone; of a private one, its
    /// owner or an admin; delete, owner or admin.
    #[test]
    fn the_ownership_table() {
        let (owner, other) = (Uuid::now_v7(), Uuid::now_v7());
        let public = image(owner, Visibility::Public);
        let private = image(owner, Visibility::Private);
        let callers = [
            ("owner", user(owner, Role::User), true, true, true),
            ("other user", user(other, Role::User), true, false, false),
            ("admin", user(other, Role::Admin), true, true, true),
            ("anonymous", Caller::Anonymous, true, false, false),
            ("accounts off", Caller::Open, true, true, true),
        ];
        for (who, caller, reads_public, reads_private, changes) in callers {
            assert_eq!(caller.may_read(&public), reads_public, "{who} reads public");
            assert_eq!(caller.may_read(&private), reads_private, "{who} reads private");
            assert_eq!(caller.may_change(&public).is_ok(), changes, "{who} changes public");
            assert_eq!(caller.may_change(&private).is_ok(), changes, "{who} changes private");
        }
        // Someone who may not see a private image learns nothing of it: 404, not 403.
        assert!(matches!(user(other, Role::User).may_change(&private), Err(None)));
        assert!(matches!(user(other, Role::User).may_change(&public), Err(Some(AuthError::Forbidden(_)))));
        assert!(matches!(Caller::Anonymous.may_change(&public), Err(Some(AuthError::MissingCredentials))));
    }
}
