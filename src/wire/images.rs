//! The image keys of `Generate`: `init_image` and `mask_image` as bytes (`ay`), or
//! `init_image_fd` and `mask_image_fd` as a file descriptor (`h`) of a regular file,
//! which the daemon reads off its async threads ([`read_fds`]); and each ControlNet's
//! control image (`controls[i].image` / `controls[i].image_fd`, [`super::controls`]),
//! read the same way.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use zbus::zvariant::Value;

use super::raw::Field;
use crate::request::{GenerateRequest, ImageInput};

/// Which image a key carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// The init image.
    Init,
    /// The mask.
    Mask,
    /// The control image of the request's ControlNet at this index in `controls`.
    Control(usize),
}

impl Slot {
    /// The bytes key of this image: in the request dict, or (a control image) in its
    /// ControlNet's dict.
    pub const fn key(self) -> &'static str {
        match self {
            Slot::Init => "init_image",
            Slot::Mask => "mask_image",
            Slot::Control(_) => "image",
        }
    }

    /// The file-descriptor key of this image (in its ControlNet's dict for a control
    /// image).
    pub const fn fd_key(self) -> &'static str {
        match self {
            Slot::Init => "init_image_fd",
            Slot::Mask => "mask_image_fd",
            Slot::Control(_) => "image_fd",
        }
    }

    /// The bytes key as messages name it: `init_image`, `controls[i].image`.
    pub fn shown_key(self) -> String {
        match self {
            Slot::Control(i) => format!("controls[{i}].image"),
            other => other.key().to_string(),
        }
    }

    /// The file-descriptor key as messages name it: `init_image_fd`,
    /// `controls[i].image_fd`.
    pub fn shown_fd_key(self) -> String {
        match self {
            Slot::Control(i) => format!("controls[{i}].image_fd"),
            other => other.fd_key().to_string(),
        }
    }

    /// The image of this slot a request holds.
    pub fn field_ref(self, request: &GenerateRequest) -> Option<&ImageInput> {
        match self {
            Slot::Init => request.init_image.as_ref(),
            Slot::Mask => request.mask_image.as_ref(),
            Slot::Control(i) => request.controls.as_ref()?.get(i)?.image.as_ref(),
        }
    }

    /// The request field this image fills (for a control image, `controls` grows to hold
    /// index `i` if it is shorter).
    pub fn field(self, request: &mut GenerateRequest) -> &mut Option<ImageInput> {
        match self {
            Slot::Init => &mut request.init_image,
            Slot::Mask => &mut request.mask_image,
            Slot::Control(i) => {
                let controls = request.controls.get_or_insert_with(Vec::new);
                if controls.len() <= i {
                    controls.resize_with(i + 1, Default::default);
                }
                &mut controls[i].image
            }
        }
    }
}

/// Reads an `ay` value of at most `max_bytes`: the size is checked before the bytes are
/// copied out of the message (once; [`finish`] hashes them off the async threads).
pub fn bytes(key: &str, v: &Field<'_>, max_bytes: usize) -> Result<Arc<[u8]>, String> {
    let Field::Bytes(bytes) = v else {
        return Err(super::keys::type_error(key, "ay", v));
    };
    if bytes.len() > max_bytes {
        return Err(format!(
            "'{key}': {} bytes is above the limit of {max_bytes} (limits.max_image_bytes)",
            bytes.len()
        ));
    }
    Ok(Arc::from(*bytes))
}

/// Writes an image as `ay`.
pub fn write(image: &ImageInput) -> Value<'_> {
    Value::from(image.bytes())
}

/// Takes an `h` value.
pub fn fd(key: &str, v: &Field<'_>) -> Result<OwnedFd, String> {
    match v {
        Field::Basic(Value::Fd(fd)) => fd
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| format!("'{key}': cannot use the file descriptor: {e}")),
        other => Err(super::keys::type_error(key, "h", other)),
    }
}

/// Puts the images a request sent into it: the byte arrays (hashed here) and the files
/// sent as descriptors ([`read_fds`]). Blocking: the daemon calls it on a blocking thread.
pub fn finish(
    request: &mut GenerateRequest,
    bytes: Vec<(Slot, Arc<[u8]>)>,
    fds: Vec<(Slot, OwnedFd)>,
    max_bytes: usize,
) -> Result<(), String> {
    for (slot, bytes) in bytes {
        *slot.field(request) = Some(ImageInput::new(bytes));
    }
    read_fds(request, fds, max_bytes)
}

/// Reads the images sent as file descriptors into the request: each must be a regular
/// file (a pipe could block a thread for ever) of at most `max_bytes`, read from offset 0.
/// Blocking: the daemon calls it on a blocking thread.
pub fn read_fds(
    request: &mut GenerateRequest,
    fds: Vec<(Slot, OwnedFd)>,
    max_bytes: usize,
) -> Result<(), String> {
    for (slot, fd) in fds {
        let key = slot.shown_fd_key();
        if slot.field(request).is_some() {
            return Err(format!("give '{}' or '{key}', not both", slot.shown_key()));
        }
        let file = std::fs::File::from(fd);
        let meta = file
            .metadata()
            .map_err(|e| format!("'{key}': cannot read the file descriptor: {e}"))?;
        if !meta.is_file() {
            return Err(format!("'{key}': must be a regular file"));
        }
        let len = usize::try_from(meta.len()).unwrap_or(usize::MAX);
        if len > max_bytes {
            return Err(format!(
                "'{key}': {len} bytes is above the limit of {max_bytes} (limits.max_image_bytes)"
            ));
        }
        // Read straight into the shared buffer the request keeps: one copy of the bytes.
        let mut buf: Arc<[u8]> = std::iter::repeat_n(0u8, len).collect();
        let dst = Arc::get_mut(&mut buf).expect("a new buffer has one owner");
        file.read_exact_at(dst, 0)
            .map_err(|e| format!("'{key}': cannot read the file: {e}"))?;
        *slot.field(request) = Some(ImageInput::new(buf));
    }
    Ok(())
}
