//! `.npy` files, read with every size checked before anything is allocated.
//!
//! The format: the magic `\x93NUMPY`, a version byte pair, the header's length (2 bytes in
//! version 1, 4 in versions 2 and 3, little-endian), then the header, a Python dict literal such
//! as `{'descr': '<f4', 'fortran_order': False, 'shape': (8, 2, 16), }`, then the data.
//!
//! Reading refuses, each with a short message that names the file and never echoes the header:
//! a header longer than numpy's default limit of 10 000 bytes, a header that is not such a dict,
//! a shape whose bytes overflow or differ from what the file holds (so a sparse or truncated
//! file costs no allocation), Fortran order and structured dtypes. Big-endian data is read and
//! byte-swapped. Writing is version 1, little-endian; `crate::output` makes it atomic.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use bytemuck::{Pod, Zeroable};

/// numpy's default `max_header_size`: longer headers need `allow_pickle`-level trust there too.
pub const MAX_HEADER_BYTES: usize = 10_000;
/// numpy 2's limit on dimensions.
const MAX_DIMS: usize = 64;
const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// What a dtype's elements are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Float,
    Signed,
    Unsigned,
    Bool,
}

/// An element type: kind, size in bytes and byte order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DType {
    pub kind: Kind,
    pub size: usize,
    big_endian: bool,
}

impl DType {
    /// numpy's name of the type (`float32`, `int64`, …).
    pub fn name(self) -> String {
        let kind = match self.kind {
            Kind::Float => "float",
            Kind::Signed => "int",
            Kind::Unsigned => "uint",
            Kind::Bool => return "bool".to_string(),
        };
        format!("{kind}{}", self.size * 8)
    }

    /// A `descr` string: byte order (`<`, `>`, `|`, `=`), kind (`f`, `i`, `u`, `b`) and size.
    fn parse(descr: &str) -> Option<Self> {
        let mut chars = descr.chars();
        let big_endian = match chars.next()? {
            '<' | '|' => false,
            '>' => true,
            '=' => cfg!(target_endian = "big"),
            _ => return None,
        };
        let kind = match chars.next()? {
            'f' => Kind::Float,
            'i' => Kind::Signed,
            'u' => Kind::Unsigned,
            'b' => Kind::Bool,
            _ => return None,
        };
        let size: usize = chars.as_str().parse().ok()?;
        let valid = match kind {
            Kind::Float => matches!(size, 2 | 4 | 8),
            Kind::Signed | Kind::Unsigned => matches!(size, 1 | 2 | 4 | 8),
            Kind::Bool => size == 1,
        };
        valid.then_some(DType {
            kind,
            size,
            big_endian: big_endian && size > 1,
        })
    }
}

/// An element type the binary reads or writes.
pub trait Element: Pod {
    const DTYPE: DType;
}

macro_rules! element {
    ($($t:ty => $kind:ident),* $(,)?) => {$(
        impl Element for $t {
            const DTYPE: DType = DType {
                kind: Kind::$kind,
                size: size_of::<$t>(),
                big_endian: false,
            };
        }
    )*};
}

/// A numpy bool (`|b1`) as its byte: numpy writes 0 or 1, but a file may hold any byte, so the
/// byte is kept for the reader to check rather than taken as a Rust `bool`.
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
#[repr(transparent)]
pub struct Bool(pub u8);

element!(
    f32 => Float, f64 => Float, half::f16 => Float,
    i8 => Signed, i16 => Signed, i32 => Signed, i64 => Signed,
    u8 => Unsigned, u16 => Unsigned, u32 => Unsigned, u64 => Unsigned,
    Bool => Bool,
);

/// An opened `.npy` file: its header parsed and checked against the file's length.
pub struct Npy {
    path: PathBuf,
    file: File,
    pub dtype: DType,
    pub shape: Vec<usize>,
    elements: usize,
}

/// `path: message`.
fn error(path: &Path, message: impl std::fmt::Display) -> String {
    format!("{}: {message}", path.display())
}

impl Npy {
    /// Opens `path` and reads its header.
    pub fn open(path: &Path) -> Result<Self, String> {
        let mut file = File::open(path).map_err(|e| error(path, e))?;
        let length = file.metadata().map_err(|e| error(path, e))?.len();
        let mut prefix = [0u8; 8];
        read_exact(&mut file, &mut prefix, path, "the magic and version")?;
        if &prefix[..6] != MAGIC {
            return Err(error(path, "not a .npy file (no \\x93NUMPY magic)"));
        }
        let (major, minor) = (prefix[6], prefix[7]);
        let header_length = match major {
            1 => {
                let mut field = [0u8; 2];
                read_exact(&mut file, &mut field, path, "the header length")?;
                usize::from(u16::from_le_bytes(field))
            }
            2 | 3 => {
                let mut field = [0u8; 4];
                read_exact(&mut file, &mut field, path, "the header length")?;
                u32::from_le_bytes(field) as usize
            }
            _ => {
                return Err(error(
                    path,
                    format!("unsupported .npy version {major}.{minor}"),
                ))
            }
        };
        if header_length > MAX_HEADER_BYTES {
            return Err(error(
                path,
                format!(
                    "the header is {header_length} bytes, above the limit of \
                     {MAX_HEADER_BYTES} (numpy's default)"
                ),
            ));
        }
        let data_offset = 8 + if major == 1 { 2 } else { 4 } + header_length as u64;
        if data_offset > length {
            return Err(error(path, "truncated: the file ends inside the header"));
        }
        let mut header = vec![0u8; header_length];
        read_exact(&mut file, &mut header, path, "the header")?;
        let header =
            std::str::from_utf8(&header).map_err(|_| error(path, "the header is not text"))?;
        let Header {
            descr,
            fortran_order,
            shape,
        } = Header::parse(header).map_err(|message| error(path, message))?;
        let dtype = DType::parse(&descr).ok_or_else(|| {
            // A short descr is worth showing; a long one is no dtype of ours.
            if descr.len() <= 8 {
                error(path, format!("unsupported dtype '{descr}'"))
            } else {
                error(path, "unsupported dtype")
            }
        })?;
        if fortran_order {
            return Err(error(
                path,
                "Fortran-ordered arrays are not supported; save with np.ascontiguousarray",
            ));
        }
        let elements = shape
            .iter()
            .try_fold(1usize, |total, &n| total.checked_mul(n))
            .ok_or_else(|| error(path, "the shape's element count overflows"))?;
        let needed = elements
            .checked_mul(dtype.size)
            .and_then(|bytes| u64::try_from(bytes).ok())
            .ok_or_else(|| error(path, "the shape's byte count overflows"))?;
        let held = length - data_offset;
        if held != needed {
            let shape = describe_shape(&shape);
            return Err(error(
                path,
                format!(
                    "a {} array of shape {shape} needs {needed} bytes of data, the file holds \
                     {held}",
                    dtype.name()
                ),
            ));
        }
        Ok(Npy {
            path: path.to_path_buf(),
            file,
            dtype,
            shape,
            elements,
        })
    }

    /// The shape as `N` dimensions, or an error naming `what` the array is.
    pub fn dims<const N: usize>(&self, what: &str) -> Result<[usize; N], String> {
        self.shape.as_slice().try_into().map_err(|_| {
            error(
                &self.path,
                format!(
                    "{what} must have {N} dimensions, got shape {}",
                    describe_shape(&self.shape)
                ),
            )
        })
    }

    /// The data as `T`, which must be the file's dtype (byte order aside).
    pub fn read<T: Element>(mut self) -> Result<Vec<T>, String> {
        if (T::DTYPE.kind, T::DTYPE.size) != (self.dtype.kind, self.dtype.size) {
            return Err(error(
                &self.path,
                format!("expected {}, got {}", T::DTYPE.name(), self.dtype.name()),
            ));
        }
        let mut values: Vec<T> = zeroed(self.elements)
            .map_err(|bytes| error(&self.path, format!("cannot allocate {bytes} bytes")))?;
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut values);
        read_exact(&mut self.file, bytes, &self.path, "the data")?;
        if self.dtype.big_endian {
            for value in bytes.chunks_exact_mut(self.dtype.size) {
                value.reverse();
            }
        }
        Ok(values)
    }
}

/// `n` zeros, or the bytes that could not be allocated.
pub fn zeroed<T: Pod>(n: usize) -> Result<Vec<T>, usize> {
    let bytes = n.saturating_mul(size_of::<T>());
    let mut values = Vec::new();
    values.try_reserve_exact(n).map_err(|_| bytes)?;
    values.resize(n, T::zeroed());
    Ok(values)
}

fn read_exact(file: &mut File, buffer: &mut [u8], path: &Path, what: &str) -> Result<(), String> {
    file.read_exact(buffer).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            error(path, format!("truncated: the file ends inside {what}"))
        } else {
            error(path, e)
        }
    })
}

/// A shape for a message: in full up to 8 dimensions, else its rank.
fn describe_shape(shape: &[usize]) -> String {
    if shape.len() <= 8 {
        format!("{shape:?}")
    } else {
        format!("of {} dimensions", shape.len())
    }
}

/// The three keys of a `.npy` header.
#[derive(Debug, PartialEq)]
struct Header {
    descr: String,
    fortran_order: bool,
    shape: Vec<usize>,
}

impl Header {
    /// Parses the header's dict literal (keys in any order, each exactly once).
    fn parse(text: &str) -> Result<Self, &'static str> {
        let mut tokens = Tokens::new(text);
        let (mut descr, mut fortran_order, mut shape) = (None, None, None);
        tokens.expect(Token::Open('{'))?;
        loop {
            let key = match tokens.next()? {
                Token::Close('}') => break,
                Token::Str(key) => key,
                _ => return Err("the header is not a dict of strings"),
            };
            tokens.expect(Token::Colon)?;
            match key {
                "descr" if descr.is_none() => match tokens.next()? {
                    Token::Str(value) => descr = Some(value.to_string()),
                    Token::Open('[') => return Err("structured dtypes are not supported"),
                    _ => return Err("the header's descr is not a string"),
                },
                "fortran_order" if fortran_order.is_none() => match tokens.next()? {
                    Token::Word("True") => fortran_order = Some(true),
                    Token::Word("False") => fortran_order = Some(false),
                    _ => return Err("the header's fortran_order is not True or False"),
                },
                "shape" if shape.is_none() => shape = Some(tokens.shape()?),
                _ => return Err("the header has an unknown or repeated key"),
            }
            match tokens.next()? {
                Token::Comma => {}
                Token::Close('}') => break,
                _ => return Err("the header is not a dict"),
            }
        }
        if !tokens.rest().trim().is_empty() {
            return Err("the header has text after its dict");
        }
        match (descr, fortran_order, shape) {
            (Some(descr), Some(fortran_order), Some(shape)) => Ok(Header {
                descr,
                fortran_order,
                shape,
            }),
            _ => Err("the header lacks descr, fortran_order or shape"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Token<'a> {
    Open(char),
    Close(char),
    Colon,
    Comma,
    Str(&'a str),
    Word(&'a str),
}

/// The tokens of a Python literal: brackets, `:`, `,`, quoted strings, words and numbers.
struct Tokens<'a> {
    text: &'a str,
}

impl<'a> Tokens<'a> {
    fn new(text: &'a str) -> Self {
        Tokens { text }
    }

    fn rest(&self) -> &'a str {
        self.text
    }

    fn next(&mut self) -> Result<Token<'a>, &'static str> {
        self.text = self.text.trim_start();
        let mut chars = self.text.chars();
        let first = chars.next().ok_or("the header ends early")?;
        let (token, length) = match first {
            '{' | '(' | '[' => (Token::Open(first), 1),
            '}' | ')' | ']' => (Token::Close(first), 1),
            ':' => (Token::Colon, 1),
            ',' => (Token::Comma, 1),
            '\'' | '"' => {
                let end = self.text[1..]
                    .find(first)
                    .ok_or("the header has an unterminated string")?;
                (Token::Str(&self.text[1..1 + end]), end + 2)
            }
            c if c.is_ascii_alphanumeric() || c == '_' => {
                let end = self
                    .text
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(self.text.len());
                (Token::Word(&self.text[..end]), end)
            }
            _ => return Err("the header has an unexpected character"),
        };
        self.text = &self.text[length..];
        Ok(token)
    }

    fn expect(&mut self, wanted: Token<'_>) -> Result<(), &'static str> {
        if self.next()? == wanted {
            Ok(())
        } else {
            Err("the header is not a dict")
        }
    }

    /// A tuple of non-negative integers: `()`, `(3,)`, `(3, 4)`, `(3, 4,)`.
    fn shape(&mut self) -> Result<Vec<usize>, &'static str> {
        self.expect(Token::Open('('))?;
        let mut shape = Vec::new();
        loop {
            match self.next()? {
                Token::Close(')') => return Ok(shape),
                Token::Word(number) => {
                    if shape.len() == MAX_DIMS {
                        return Err("the header's shape has more than 64 dimensions");
                    }
                    let n = number
                        .parse()
                        .map_err(|_| "the header's shape holds something else than sizes")?;
                    shape.push(n);
                }
                _ => return Err("the header's shape is not a tuple of sizes"),
            }
            match self.next()? {
                Token::Comma => {}
                Token::Close(')') => return Ok(shape),
                _ => return Err("the header's shape is not a tuple of sizes"),
            }
        }
    }
}

/// Writes `values` as a little-endian `.npy` array of `shape` to `path`, flushed to disk.
pub fn write<T: Element>(path: &Path, shape: &[usize], values: &[T]) -> Result<(), String> {
    let DType { kind, size, .. } = T::DTYPE;
    let kind = match kind {
        Kind::Float => 'f',
        Kind::Signed => 'i',
        Kind::Unsigned => 'u',
        Kind::Bool => 'b',
    };
    let order = if size == 1 { '|' } else { '<' };
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    let shape = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header =
        format!("{{'descr': '{order}{kind}{size}', 'fortran_order': False, 'shape': {shape}, }}");
    // Version 1: magic, version, 2-byte length; the data starts on a 64-byte boundary.
    let unpadded = MAGIC.len() + 2 + 2 + header.len() + 1;
    header.extend(std::iter::repeat_n(
        ' ',
        unpadded.next_multiple_of(64) - unpadded,
    ));
    header.push('\n');
    let length = u16::try_from(header.len()).map_err(|_| error(path, "shape too long"))?;
    let file = File::create(path).map_err(|e| error(path, e))?;
    let mut out = BufWriter::new(file);
    let io = |e: std::io::Error| error(path, e);
    out.write_all(MAGIC).map_err(io)?;
    out.write_all(&[1, 0]).map_err(io)?;
    out.write_all(&length.to_le_bytes()).map_err(io)?;
    out.write_all(header.as_bytes()).map_err(io)?;
    if cfg!(target_endian = "big") {
        for value in values {
            let mut bytes = bytemuck::bytes_of(value).to_vec();
            bytes.reverse();
            out.write_all(&bytes).map_err(io)?;
        }
    } else {
        out.write_all(bytemuck::cast_slice(values)).map_err(io)?;
    }
    let file = out.into_inner().map_err(|e| error(path, e.error()))?;
    file.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_parse_in_any_key_order_and_spacing() {
        let header =
            Header::parse("{'shape': (3, 4,), \"descr\": '>f8','fortran_order':False}").unwrap();
        assert_eq!(
            header,
            Header {
                descr: ">f8".into(),
                fortran_order: false,
                shape: vec![3, 4]
            }
        );
        assert_eq!(
            Header::parse("{'descr': '<i8', 'fortran_order': True, 'shape': (), }")
                .unwrap()
                .shape,
            Vec::<usize>::new()
        );
        for bad in [
            "",
            "{",
            "{'descr': '<f4'}",
            "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,)}",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'x': 1}",
            "{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (1,)}",
            "{'descr': '<f4', 'fortran_order': 0, 'shape': (1,)}",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (-1,)}",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1,)} junk",
            "{'descr': '<f4, 'fortran_order': False, 'shape': (1,)}",
        ] {
            assert!(Header::parse(bad).is_err(), "{bad}");
        }
        let deep = format!(
            "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}), }}",
            "1, ".repeat(65)
        );
        assert!(Header::parse(&deep).is_err());
    }

    #[test]
    fn dtypes_parse_with_their_byte_order() {
        let dtype = DType::parse(">f4").unwrap();
        assert_eq!(
            (dtype.kind, dtype.size, dtype.big_endian),
            (Kind::Float, 4, true)
        );
        assert_eq!(DType::parse("|u1").unwrap().name(), "uint8");
        assert_eq!(DType::parse("|b1").unwrap().name(), "bool");
        assert!(!DType::parse(">i1").unwrap().big_endian);
        for bad in ["<f3", "<c8", "f4", "<U10", "<f", "<i16", "O", "|b2"] {
            assert_eq!(DType::parse(bad), None, "{bad}");
        }
    }
}
