//! The first start with accounts on: with no admin yet, create one and an API key for it,
//! write the key to a file only its owner can read, and say where, once. Images recorded
//! before accounts existed (or with them off) go to the first admin.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::{Accounts, AuthError};
use crate::metadata::{MetadataStore, Role, User};

/// The first admin's name, unless someone registered it as a plain user already.
const FIRST_ADMIN: &str = "admin";

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("cannot create the first admin")]
    Account(#[from] AuthError),
    #[error(
        "created the first admin {user:?} but cannot write its API key to {path}: fix the directory, then run \
         `chitram keys create --user {user}` for a key (this start's key is lost)"
    )]
    TokenFile {
        user: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What the first start did.
#[derive(Debug, PartialEq, Eq)]
pub enum Bootstrap {
    /// An admin existed already.
    AdminExists,
    /// Created the first admin; its key is in this file.
    CreatedAdmin { user: String, token_file: PathBuf },
}

pub async fn ensure_first_admin(
    accounts: &Accounts,
    metadata: &dyn MetadataStore,
    token_file: &Path,
) -> Result<Bootstrap, BootstrapError> {
    let outcome = match metadata.first_admin().await.map_err(AuthError::from)? {
        Some(admin) => {
            adopt(metadata, &admin).await?;
            return Ok(Bootstrap::AdminExists);
        }
        None => create_admin(accounts, metadata, token_file).await?,
    };
    if let Some(admin) = metadata.first_admin().await.map_err(AuthError::from)? {
        adopt(metadata, &admin).await?;
    }
    Ok(outcome)
}

async fn create_admin(
    accounts: &Accounts,
    metadata: &dyn MetadataStore,
    token_file: &Path,
) -> Result<Bootstrap, BootstrapError> {
    let user = match accounts.create_user(FIRST_ADMIN, None, Role::Admin).await {
        Ok(user) => user,
        // Another instance starting at the same moment made it: it writes the key.
        Err(AuthError::UsernameTaken(_)) if metadata.first_admin().await.map_err(AuthError::from)?.is_some() => {
            return Ok(Bootstrap::AdminExists);
        }
        Err(AuthError::UsernameTaken(_)) => {
            let name = format!("{FIRST_ADMIN}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
            accounts.create_user(&name, None, Role::Admin).await?
        }
        Err(error) => return Err(error.into()),
    };
    let (_, secret) = accounts.create_key_for(user.id, "first admin key").await?;
    write_token_file(token_file, &secret).map_err(|source| BootstrapError::TokenFile {
        user: user.username.clone(),
        path: token_file.to_path_buf(),
        source,
    })?;
    tracing::warn!(
        user = %user.username,
        token_file = %token_file.display(),
        "created the first admin; its API key is in the token file (readable only by this user): use it as \
         `Authorization: Bearer <key>`, create your own keys, then delete the file"
    );
    Ok(Bootstrap::CreatedAdmin { user: user.username, token_file: token_file.to_path_buf() })
}

async fn adopt(metadata: &dyn MetadataStore, admin: &User) -> Result<(), AuthError> {
    let adopted = metadata.adopt_unowned_images(admin.id).await?;
    if adopted > 0 {
        tracing::info!(images = adopted, owner = %admin.username, "gave images recorded without an owner to the first admin");
    }
    Ok(())
}

/// Writes the key with mode 0600 from the start: it is never readable by others, even for
/// a moment.
pub fn write_token_file(path: &Path, secret: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        options.mode(0o600);
        let mut file = options.open(path)?;
        // An existing file keeps its mode on open: set it.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        writeln!(file, "{secret}")?;
        file.sync_all()
    }
    #[cfg(not(unix))]
    {
        let mut file = options.open(path)?;
        writeln!(file, "{secret}")?;
        file.sync_all()
    }
}
