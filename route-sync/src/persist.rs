//! Last known good on disk: route sets written atomically (temp file, fsync, rename) as
//! protobuf `Update` snapshots, so a restart serves what it had, marked stale, until fresh.

use std::io::Write;
use std::path::Path;

use prost::Message;

use crate::proto;

/// Writes `update` to `path` atomically: readers see the old file or the new one, never a
/// torn one.
///
/// # Errors
/// Any I/O error; the previous file is then untouched.
pub fn save(path: &Path, update: &proto::Update) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(&update.encode_to_vec())?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)
}

/// Reads a saved update; `None` when there is no file. A file that does not decode is an
/// error, never silently an empty table.
///
/// # Errors
/// When the file exists but cannot be read or decoded.
pub fn load(path: &Path) -> std::io::Result<Option<proto::Update>> {
    match std::fs::read(path) {
        Ok(bytes) => proto::Update::decode(bytes.as_slice())
            .map(Some)
            .map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{} is not a saved route table: {e}", path.display()),
                )
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Decodes saved routes into the model, skipping (and counting) any that no longer validate.
pub fn routes_of(update: &proto::Update) -> (Vec<crate::Route>, usize) {
    let mut bad = 0;
    let routes = update
        .upserts
        .iter()
        .filter_map(|r| match r.to_model() {
            Ok(route) => Some(route),
            Err(_) => {
                bad += 1;
                None
            }
        })
        .collect();
    (routes, bad)
}
