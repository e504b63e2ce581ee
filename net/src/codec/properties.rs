//! The MQTT 5 property table (section 2.2.2.2): each property's identifier, the [`Properties`]
//! field that holds it, its value type, the packets it may appear in and the check on its value.
//! Decoding ([`read_property`], [`allowed`]) and encoding ([`for_each_property`]) are both
//! generated from this one table, so the two cannot disagree.

use super::*;

/// Which packet a property block belongs to; decides which identifiers are allowed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum PropCtx {
    Connect,
    Will,
    ConnAck,
    Publish,
    Ack,
    Subscribe,
    SubAck,
    Unsubscribe,
    Disconnect,
    Auth,
}

/// One property value as it goes on the wire (MQTT 1.5 data representation).
pub(super) enum Value<'a> {
    Byte(u8),
    TwoByte(u16),
    FourByte(u32),
    Varint(u32),
    Utf8(&'a str),
    Binary(&'a [u8]),
    Pair(&'a str, &'a str),
}

/// How a value type is read from a packet, stored in its field and handed to the encoder.
trait Kind {
    type Field;
    type Owned;
    fn read(r: &mut Reader) -> Result<Self::Owned>;
    fn store(field: &mut Self::Field, v: Self::Owned);
    fn visit<'a>(field: &'a Self::Field, f: &mut impl FnMut(Value<'a>));
}

struct Byte;
struct TwoByte;
struct FourByte;
/// A variable byte integer that may repeat (subscription identifiers).
struct Varints;
struct Utf8;
struct Binary;
/// A UTF-8 string pair that may repeat (user properties).
struct Pairs;

impl Kind for Byte {
    type Field = Option<u8>;
    type Owned = u8;
    fn read(r: &mut Reader) -> Result<u8> {
        r.u8()
    }
    fn store(field: &mut Option<u8>, v: u8) {
        *field = Some(v);
    }
    fn visit<'a>(field: &'a Option<u8>, f: &mut impl FnMut(Value<'a>)) {
        if let Some(v) = *field {
            f(Value::Byte(v));
        }
    }
}

impl Kind for TwoByte {
    type Field = Option<u16>;
    type Owned = u16;
    fn read(r: &mut Reader) -> Result<u16> {
        r.u16()
    }
    fn store(field: &mut Option<u16>, v: u16) {
        *field = Some(v);
    }
    fn visit<'a>(field: &'a Option<u16>, f: &mut impl FnMut(Value<'a>)) {
        if let Some(v) = *field {
            f(Value::TwoByte(v));
        }
    }
}

impl Kind for FourByte {
    type Field = Option<u32>;
    type Owned = u32;
    fn read(r: &mut Reader) -> Result<u32> {
        r.u32()
    }
    fn store(field: &mut Option<u32>, v: u32) {
        *field = Some(v);
    }
    fn visit<'a>(field: &'a Option<u32>, f: &mut impl FnMut(Value<'a>)) {
        if let Some(v) = *field {
            f(Value::FourByte(v));
        }
    }
}

impl Kind for Varints {
    type Field = Vec<u32>;
    type Owned = u32;
    fn read(r: &mut Reader) -> Result<u32> {
        r.varint()
    }
    fn store(field: &mut Vec<u32>, v: u32) {
        field.push(v);
    }
    fn visit<'a>(field: &'a Vec<u32>, f: &mut impl FnMut(Value<'a>)) {
        for &v in field {
            f(Value::Varint(v));
        }
    }
}

impl Kind for Utf8 {
    type Field = Option<String>;
    type Owned = String;
    fn read(r: &mut Reader) -> Result<String> {
        r.string()
    }
    fn store(field: &mut Option<String>, v: String) {
        *field = Some(v);
    }
    fn visit<'a>(field: &'a Option<String>, f: &mut impl FnMut(Value<'a>)) {
        if let Some(v) = field {
            f(Value::Utf8(v));
        }
    }
}

impl Kind for Binary {
    type Field = Option<Bytes>;
    type Owned = Bytes;
    fn read(r: &mut Reader) -> Result<Bytes> {
        Ok(Bytes::copy_from_slice(r.binary()?))
    }
    fn store(field: &mut Option<Bytes>, v: Bytes) {
        *field = Some(v);
    }
    fn visit<'a>(field: &'a Option<Bytes>, f: &mut impl FnMut(Value<'a>)) {
        if let Some(v) = field {
            f(Value::Binary(v));
        }
    }
}

impl Kind for Pairs {
    type Field = Vec<(String, String)>;
    type Owned = (String, String);
    fn read(r: &mut Reader) -> Result<(String, String)> {
        let k = r.string()?;
        let v = r.string()?;
        Ok((k, v))
    }
    fn store(field: &mut Vec<(String, String)>, v: (String, String)) {
        field.push(v);
    }
    fn visit<'a>(field: &'a Vec<(String, String)>, f: &mut impl FnMut(Value<'a>)) {
        for (k, v) in field {
            f(Value::Pair(k, v));
        }
    }
}

/// Byte properties that are booleans must be 0 or 1 (a protocol error otherwise).
fn flag01(v: u8) -> Result<u8> {
    if v > 1 {
        return Err(DecodeError::Protocol("property value must be 0 or 1"));
    }
    Ok(v)
}

/// Properties whose value 0 is a protocol error; `what` names it in the error.
fn nonzero<T: Default + PartialEq>(what: &'static str) -> impl Fn(T) -> Result<T> {
    move |v| {
        if v == T::default() {
            return Err(DecodeError::Protocol(what));
        }
        Ok(v)
    }
}

/// Generates [`allowed`], [`read_property`] and [`for_each_property`] from one table.
macro_rules! property_table {
    ($($id:literal $field:ident: $kind:ident in [$($ctx:ident),+] $(check $check:expr)?;)*) => {
        /// Whether property `id` may appear in a packet of kind `ctx`.
        pub(super) fn allowed(ctx: PropCtx, id: u8) -> bool {
            use PropCtx::*;
            match id {
                $($id => matches!(ctx, $($ctx)|+),)*
                _ => false,
            }
        }

        /// Reads the value of property `id` (already [`allowed`]) into its field of `p`.
        pub(super) fn read_property(r: &mut Reader, id: u8, p: &mut Properties) -> Result<()> {
            match id {
                $($id => {
                    let v = <$kind>::read(r)?;
                    $(let v = ($check)(v)?;)?
                    <$kind>::store(&mut p.$field, v);
                })*
                _ => return Err(DecodeError::Malformed("unknown property identifier")),
            }
            Ok(())
        }

        /// Calls `f` with every property set in `p`, in identifier order: what encoding writes.
        pub(super) fn for_each_property<'a>(p: &'a Properties, mut f: impl FnMut(u8, Value<'a>)) {
            $(<$kind>::visit(&p.$field, &mut |v| f($id, v));)*
        }
    };
}

property_table! {
    0x01 payload_format_indicator: Byte in [Will, Publish] check flag01;
    0x02 message_expiry_interval: FourByte in [Will, Publish];
    0x03 content_type: Utf8 in [Will, Publish];
    0x08 response_topic: Utf8 in [Will, Publish];
    0x09 correlation_data: Binary in [Will, Publish];
    0x0B subscription_identifiers: Varints in [Publish, Subscribe]
        check nonzero("subscription identifier 0");
    0x11 session_expiry_interval: FourByte in [Connect, ConnAck, Disconnect];
    0x12 assigned_client_identifier: Utf8 in [ConnAck];
    0x13 server_keep_alive: TwoByte in [ConnAck];
    0x15 authentication_method: Utf8 in [Connect, ConnAck, Auth];
    0x16 authentication_data: Binary in [Connect, ConnAck, Auth];
    0x17 request_problem_information: Byte in [Connect] check flag01;
    0x18 will_delay_interval: FourByte in [Will];
    0x19 request_response_information: Byte in [Connect] check flag01;
    0x1A response_information: Utf8 in [ConnAck];
    0x1C server_reference: Utf8 in [ConnAck, Disconnect];
    0x1F reason_string: Utf8 in [ConnAck, Ack, SubAck, Disconnect, Auth];
    0x21 receive_maximum: TwoByte in [Connect, ConnAck] check nonzero("receive maximum 0");
    0x22 topic_alias_maximum: TwoByte in [Connect, ConnAck];
    0x23 topic_alias: TwoByte in [Publish] check nonzero("topic alias 0");
    0x24 maximum_qos: Byte in [ConnAck] check flag01;
    0x25 retain_available: Byte in [ConnAck] check flag01;
    0x26 user_properties: Pairs in [
        Connect, Will, ConnAck, Publish, Ack, Subscribe, SubAck, Unsubscribe, Disconnect, Auth
    ];
    0x27 maximum_packet_size: FourByte in [Connect, ConnAck]
        check nonzero("maximum packet size 0");
    0x28 wildcard_subscription_available: Byte in [ConnAck] check flag01;
    0x29 subscription_identifier_available: Byte in [ConnAck] check flag01;
    0x2A shared_subscription_available: Byte in [ConnAck] check flag01;
}
