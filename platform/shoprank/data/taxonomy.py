"""The simulated shop's catalogue structure: departments > categories > leaf types.

Hand-written so that generated listings read like a real shop's: every leaf has
the noun a title uses, the synonyms shoppers type instead, the attributes that
vary between its products, a typical price and the leaves it complements (a
frying pan's spatula). Brands belong to a category and come in price tiers.
"""

from __future__ import annotations

from dataclasses import dataclass

ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "color": ("Black", "White", "Grey", "Red", "Blue", "Navy", "Green", "Pink", "Beige", "Silver"),
    "cookware_material": ("Cast Iron", "Stainless Steel", "Non-Stick Aluminium", "Copper", "Ceramic"),
    "appliance_material": ("Stainless Steel", "Plastic", "Glass", "Brushed Aluminium"),
    "textile": ("Cotton", "Linen", "Bamboo", "Microfibre", "Silk"),
    "fabric": ("Cotton", "Organic Cotton", "Polyester", "Wool", "Denim", "Linen"),
    "electronics_material": ("Plastic", "Aluminium", "Fabric", "Leather"),
    "outdoor_material": ("Nylon", "Polyester", "Canvas", "Ripstop"),
    "fitness_material": ("Rubber", "TPE", "Neoprene", "Cast Iron"),
    "skin_type": ("Dry Skin", "Oily Skin", "Sensitive Skin", "All Skin Types"),
    "pan_size": ("20 cm", "24 cm", "28 cm", "32 cm"),
    "volume": ("1 L", "1.5 L", "2 L", "5 L"),
    "bed_size": ("Single", "Double", "King", "Super King"),
    "clothing_size": ("XS", "S", "M", "L", "XL"),
    "shoe_size": ("UK 5", "UK 7", "UK 9", "UK 11"),
    "screen_size": ("24 inch", "27 inch", "32 inch"),
    "capacity": ("10000 mAh", "20000 mAh", "30000 mAh"),
    "bottle_size": ("50 ml", "100 ml", "250 ml", "500 ml"),
    "weight": ("2 kg", "5 kg", "10 kg", "20 kg"),
    "tent_size": ("2-Person", "4-Person", "6-Person"),
    "pack_volume": ("20 L", "30 L", "45 L", "65 L"),
}
"""Value pools; a leaf names which pool fills each of its attributes."""


@dataclass(frozen=True)
class Leaf:
    """A leaf product type: the unit of a shopper's intent."""

    department: str
    category: str
    name: str
    noun: str
    synonyms: tuple[str, ...]
    attributes: tuple[tuple[str, str], ...]
    """(attribute name, value pool) pairs, e.g. ("material", "cookware_material")."""
    price: float
    """Median price in the shop's currency."""
    complements: tuple[str, ...] = ()

    @property
    def path(self) -> str:
        """The category path as product records carry it."""
        return f"{self.department} > {self.category} > {self.name}"


def _leaves() -> tuple[Leaf, ...]:
    c = ("color", "color")
    spec = {
        ("Home & Kitchen", "Cookware"): [
            ("Frying Pans", "Frying Pan", ("skillet", "fry pan"), (("material", "cookware_material"), ("size", "pan_size"), c), 35, ("Spatulas", "Saucepans")),
            ("Saucepans", "Saucepan", ("cooking pot", "sauce pot"), (("material", "cookware_material"), ("size", "volume"), c), 40, ("Frying Pans",)),
            ("Dutch Ovens", "Dutch Oven", ("casserole dish", "cocotte"), (("material", "cookware_material"), ("size", "volume"), c), 90, ("Saucepans",)),
            ("Woks", "Wok", ("stir fry pan",), (("material", "cookware_material"), ("size", "pan_size")), 45, ("Spatulas",)),
            ("Spatulas", "Spatula", ("turner", "flipper"), (("material", "appliance_material"), c), 12, ("Frying Pans", "Woks")),
        ],
        ("Home & Kitchen", "Kitchen Appliances"): [
            ("Blenders", "Blender", ("smoothie maker", "liquidiser"), (("material", "appliance_material"), ("capacity", "volume"), c), 70, ()),
            ("Coffee Makers", "Coffee Maker", ("coffee machine", "espresso maker"), (("material", "appliance_material"), c), 120, ("Electric Kettles",)),
            ("Toasters", "Toaster", ("2 slice toaster", "sandwich toaster"), (("material", "appliance_material"), c), 40, ("Electric Kettles",)),
            ("Electric Kettles", "Electric Kettle", ("kettle", "water boiler"), (("material", "appliance_material"), ("capacity", "volume"), c), 35, ("Toasters", "Coffee Makers")),
        ],
        ("Home & Kitchen", "Bedding"): [
            ("Duvet Covers", "Duvet Cover", ("comforter cover", "quilt cover"), (("material", "textile"), ("size", "bed_size"), c), 45, ("Pillows", "Bed Sheets")),
            ("Pillows", "Pillow", ("bed pillow", "cushion"), (("material", "textile"), ("size", "bed_size")), 25, ("Duvet Covers",)),
            ("Bed Sheets", "Fitted Sheet", ("sheet set", "bed linen"), (("material", "textile"), ("size", "bed_size"), c), 30, ("Duvet Covers",)),
        ],
        ("Electronics", "Audio"): [
            ("Headphones", "Wireless Headphones", ("headset", "earphones", "over ear headphones"), (("material", "electronics_material"), c), 90, ()),
            ("Bluetooth Speakers", "Bluetooth Speaker", ("wireless speaker", "portable speaker"), (("material", "electronics_material"), c), 60, ("Power Banks",)),
            ("Soundbars", "Soundbar", ("tv speaker", "sound bar"), (c,), 180, ()),
        ],
        ("Electronics", "Computer Accessories"): [
            ("Keyboards", "Mechanical Keyboard", ("keyboard", "gaming keyboard"), (("material", "electronics_material"), c), 75, ("Mice",)),
            ("Mice", "Wireless Mouse", ("mouse", "computer mouse"), (("material", "electronics_material"), c), 30, ("Keyboards", "Laptop Stands")),
            ("Monitors", "Monitor", ("screen", "display", "computer monitor"), (("size", "screen_size"), c), 260, ("Laptop Stands",)),
            ("Laptop Stands", "Laptop Stand", ("notebook stand", "laptop riser"), (("material", "electronics_material"), c), 35, ("Mice", "Monitors")),
        ],
        ("Electronics", "Phone Accessories"): [
            ("Phone Cases", "Phone Case", ("phone cover", "mobile case"), (("material", "electronics_material"), c), 15, ("Chargers",)),
            ("Chargers", "USB-C Charger", ("charging plug", "power adapter"), (c,), 20, ("Phone Cases", "Power Banks")),
            ("Power Banks", "Power Bank", ("portable charger", "battery pack"), (("capacity", "capacity"), c), 35, ("Chargers",)),
        ],
        ("Clothing", "Men's Clothing"): [
            ("Men's T-Shirts", "Men's T-Shirt", ("tee", "mens tshirt"), (("material", "fabric"), ("size", "clothing_size"), c), 18, ("Men's Jeans",)),
            ("Men's Jeans", "Men's Slim Fit Jeans", ("denim", "mens jeans"), (("size", "clothing_size"), c), 55, ("Men's T-Shirts",)),
            ("Men's Jackets", "Men's Jacket", ("coat", "mens jacket"), (("material", "fabric"), ("size", "clothing_size"), c), 95, ()),
        ],
        ("Clothing", "Women's Clothing"): [
            ("Dresses", "Women's Midi Dress", ("dress", "summer dress"), (("material", "fabric"), ("size", "clothing_size"), c), 50, ("Sandals",)),
            ("Sweaters", "Women's Sweater", ("jumper", "pullover", "cardigan"), (("material", "fabric"), ("size", "clothing_size"), c), 45, ()),
            ("Leggings", "Women's Leggings", ("yoga pants", "tights"), (("size", "clothing_size"), c), 25, ("Yoga Mats",)),
        ],
        ("Clothing", "Shoes"): [
            ("Running Shoes", "Running Shoes", ("trainers", "sneakers", "running trainers"), (("size", "shoe_size"), c), 85, ()),
            ("Boots", "Ankle Boots", ("boots", "chelsea boots"), (("material", "electronics_material"), ("size", "shoe_size"), c), 90, ()),
            ("Sandals", "Sandals", ("flip flops", "slides"), (("size", "shoe_size"), c), 30, ("Dresses",)),
        ],
        ("Sports & Outdoors", "Fitness"): [
            ("Yoga Mats", "Yoga Mat", ("exercise mat", "gym mat"), (("material", "fitness_material"), c), 25, ("Resistance Bands", "Leggings")),
            ("Dumbbells", "Dumbbell Set", ("weights", "hand weights"), (("material", "fitness_material"), ("weight", "weight")), 60, ("Yoga Mats",)),
            ("Resistance Bands", "Resistance Bands", ("exercise bands", "workout bands"), (("material", "fitness_material"), c), 15, ("Yoga Mats",)),
        ],
        ("Sports & Outdoors", "Camping"): [
            ("Tents", "Camping Tent", ("tent", "dome tent"), (("material", "outdoor_material"), ("size", "tent_size"), c), 140, ("Sleeping Bags",)),
            ("Sleeping Bags", "Sleeping Bag", ("sleep bag", "mummy bag"), (("material", "outdoor_material"), c), 55, ("Tents", "Backpacks")),
            ("Backpacks", "Hiking Backpack", ("rucksack", "daypack"), (("material", "outdoor_material"), ("size", "pack_volume"), c), 70, ("Sleeping Bags",)),
        ],
        ("Sports & Outdoors", "Cycling"): [
            ("Bike Helmets", "Bike Helmet", ("cycling helmet", "bicycle helmet"), (("size", "clothing_size"), c), 50, ("Bike Lights",)),
            ("Bike Lights", "Bike Light Set", ("bicycle lights", "cycle lights"), (c,), 25, ("Bike Helmets",)),
        ],
        ("Beauty", "Skin Care"): [
            ("Moisturisers", "Face Moisturiser", ("face cream", "moisturizer", "day cream"), (("skin_type", "skin_type"), ("size", "bottle_size")), 22, ("Cleansers", "Sunscreen")),
            ("Sunscreen", "Sunscreen SPF 50", ("sunblock", "sun cream", "spf"), (("skin_type", "skin_type"), ("size", "bottle_size")), 15, ("Moisturisers",)),
            ("Cleansers", "Facial Cleanser", ("face wash", "cleansing gel"), (("skin_type", "skin_type"), ("size", "bottle_size")), 12, ("Moisturisers",)),
        ],
        ("Beauty", "Hair Care"): [
            ("Shampoo", "Shampoo", ("hair wash",), (("size", "bottle_size"),), 9, ("Conditioner",)),
            ("Conditioner", "Conditioner", ("hair conditioner",), (("size", "bottle_size"),), 9, ("Shampoo",)),
            ("Hair Dryers", "Hair Dryer", ("blow dryer", "hairdryer"), (c,), 55, ("Shampoo",)),
        ],
    }
    return tuple(
        Leaf(dept, cat, name, noun, syn, attrs, float(price), comp)
        for (dept, cat), leaves in spec.items()
        for (name, noun, syn, attrs, price, comp) in leaves
    )


LEAVES: tuple[Leaf, ...] = _leaves()
LEAF_INDEX: dict[str, int] = {leaf.name: i for i, leaf in enumerate(LEAVES)}
CATEGORIES: tuple[str, ...] = tuple(dict.fromkeys(leaf.category for leaf in LEAVES))

BRANDS: dict[str, tuple[str, ...]] = {
    "Cookware": ("Ferrovia", "Castellan", "PanCraft", "Maison Cuivre", "Kookwise", "Basix"),
    "Kitchen Appliances": ("Brewhaus", "Kitchora", "Voltana", "Morning Co", "Basix", "Zestro"),
    "Bedding": ("Dreamloom", "Nordvik Home", "Softhaven", "Linenly", "Basix"),
    "Audio": ("Sonique", "Auralis", "BassForge", "Tonewell", "Veridian"),
    "Computer Accessories": ("Keyforge", "Logiq", "Deskwise", "Pixelon", "Veridian"),
    "Phone Accessories": ("Chargio", "Casemate", "Voltana", "Ampere Lab", "Veridian"),
    "Men's Clothing": ("Northfold", "Urban Thread", "Harbour & Co", "Basix", "Ridgeway"),
    "Women's Clothing": ("Maren", "Luma Studio", "Urban Thread", "Velvet Fern", "Basix"),
    "Shoes": ("Stridex", "Trailhoof", "Cobble & Lace", "Pacewell", "Ridgeway"),
    "Fitness": ("Flexcore", "Ironpulse", "Zenmat", "Pacewell", "Basix"),
    "Camping": ("Summitline", "Trailhoof", "Wildcamp", "Ridgeway", "Basix"),
    "Cycling": ("Velosafe", "Spokelight", "Pacewell", "Ridgeway"),
    "Skin Care": ("Dermaleaf", "Purelle", "Solbright", "Aquaveil", "Basix"),
    "Hair Care": ("Silkroot", "Purelle", "Lumihair", "Basix"),
}
"""Brands per category, budget to premium within a category is set by BRAND_TIERS."""

BRAND_TIERS: tuple[float, ...] = (1.0, 1.35, 0.8, 1.9, 1.1, 0.55)
"""Price multiplier of a category's i-th brand (cycled): brands differ in price level."""

PRODUCT_LINES: tuple[str, ...] = ("Pro", "Classic", "Essential", "Ultra", "Signature", "Eco", "Max", "Lite")

FEATURES: dict[str, tuple[str, ...]] = {
    "Home & Kitchen": (
        "Dishwasher safe and easy to clean.", "Suitable for all hob types, including induction.",
        "Backed by a 5-year guarantee.", "Designed for everyday family use.",
        "Compact design that saves space in small kitchens.", "Free from PFOA and BPA.",
    ),
    "Electronics": (
        "Charges over USB-C in under two hours.", "Bluetooth 5.3 with a stable 15 m range.",
        "Comes with a 2-year manufacturer warranty.", "Works with Windows, macOS, iOS and Android.",
        "Low-latency mode for gaming and video.", "Energy-efficient standby under 0.5 W.",
    ),
    "Clothing": (
        "Machine washable at 30 degrees.", "Regular fit that keeps its shape after washing.",
        "Breathable fabric for all-day comfort.", "Made with responsibly sourced materials.",
        "Reinforced seams for durability.", "True to size; see the size guide.",
    ),
    "Sports & Outdoors": (
        "Lightweight and easy to carry.", "Water-resistant for outdoor use.",
        "Non-slip grip for safe training.", "Tested for durability in all seasons.",
        "Packs down small for travel.", "Reflective details for visibility at night.",
    ),
    "Beauty": (
        "Dermatologically tested.", "Vegan and cruelty free.", "Fragrance free, suitable for daily use.",
        "Enriched with hyaluronic acid and vitamin E.", "Recyclable packaging.",
        "Absorbs quickly without a greasy feel.",
    ),
}
