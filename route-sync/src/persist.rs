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
    save_message(path, update)
}

/// Writes any protobuf message to `path` atomically, as [`save`] does.
///
/// # Errors
/// Any I/O error; the previous file is then untouched.
pub fn save_message(path: &Path, message: &impl Message) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(&message.encode_to_vec())?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)
}

/// Reads a message saved by [`save_message`]; `None` when there is no file.
///
/// # Errors
/// When the file exists but cannot be read or decoded as `M`.
pub fn load_message<M: Message + Default>(path: &Path) -> std::io::Result<Option<M>> {
    match std::fs::read(path) {
        Ok(bytes) => M::decode(bytes.as_slice()).map(Some).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} does not decode: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes a snapshot to `path` atomically, as [`save`] does: `header` (its epoch, revision
/// and flags; its own upserts too) followed by `routes`, encoded one at a time as they come,
/// so a table of 250,000 routes is never held a second time, in wire form, to be saved. The
/// file decodes as one `Update` whose upserts are all of them.
///
/// # Errors
/// Any I/O error; the previous file is then untouched.
pub fn save_routes(
    path: &Path,
    header: &proto::Update,
    routes: impl IntoIterator<Item = proto::Route>,
) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut file = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
    file.write_all(&header.encode_to_vec())?;
    // Protobuf concatenates repeated fields: an `Update` holding one route encodes as that
    // route's `upserts` entry alone, appended after the header.
    let mut one = proto::Update::default();
    let mut buf = Vec::new();
    for route in routes {
        one.upserts.push(route);
        buf.clear();
        one.encode(&mut buf)?;
        one.upserts.clear();
        file.write_all(&buf)?;
    }
    let file = file
        .into_inner()
        .map_err(std::io::IntoInnerError::into_error)?;
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
    let mut names = proto::Names::default();
    let routes = update
        .upserts
        .iter()
        .filter_map(|r| match r.to_model_with(&mut names) {
            Ok(route) => Some(route),
            Err(_) => {
                bad += 1;
                None
            }
        })
        .collect();
    (routes, bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_saved_one_at_a_time_load_as_one_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let route = |name: &str| proto::Route {
            name: name.into(),
            port: 80,
            home_cluster: "k8s".into(),
            ..proto::Route::default()
        };
        let header = proto::Update {
            epoch: "e1".into(),
            revision: 42,
            snapshot: true,
            cluster: "k8s".into(),
            ..proto::Update::default()
        };
        let routes = vec![route("a.apps.internal"), route("b.apps.internal")];
        let streamed = dir.path().join("streamed.pb");
        save_routes(&streamed, &header, routes.clone()).unwrap();
        let whole = proto::Update {
            upserts: routes,
            ..header.clone()
        };
        assert_eq!(load(&streamed).unwrap().unwrap(), whole);
        let (loaded, bad) = routes_of(&load(&streamed).unwrap().unwrap());
        assert_eq!((loaded.len(), bad), (2, 0));
    }
}
